// The loops of an unmeasured step: loops.h, compiled here.
#include "loops.h"

namespace lrfuse::cpu {

#define LRFUSE_INSTANTIATE(Rule) LRFUSE_CPU_LOOPS(, Rule, false)
LRFUSE_RULES(LRFUSE_INSTANTIATE)
#undef LRFUSE_INSTANTIATE

}  // namespace lrfuse::cpu
