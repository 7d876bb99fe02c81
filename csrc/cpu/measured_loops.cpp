// The loops of a measured step (track_stats), the update with the sums in the loop: loops.h, compiled here.
#include "loops.h"

namespace lrfuse::cpu {

#define LRFUSE_INSTANTIATE(Rule) LRFUSE_CPU_LOOPS(, Rule, true)
LRFUSE_RULES(LRFUSE_INSTANTIATE)
#undef LRFUSE_INSTANTIATE

}  // namespace lrfuse::cpu
