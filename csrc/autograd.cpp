// What the fused ops owe autograd as in-place ops that are not differentiable.
//
// - Versions: every tensor they write gets its version bumped, as torch.optim's default (for-loop
//   and foreach) steps do. Autograd compares a saved tensor's version at backward, so a backward
//   through a graph that saved a parameter the step has since updated raises instead of using
//   the new values. This is the ADInplaceOrView kernel of every op, as for torch's own in-place
//   ops: it runs for tensors that track versions, after the backend kernel (a call its checks
//   refuse bumps nothing), and not for inference tensors.
// - No graph: under grad mode a written tensor that requires grad is refused, as torch refuses an
//   in-place update of a leaf that requires grad; optimizers step under torch.no_grad(). This is
//   the Autograd kernel; with grad mode off it passes the call on without looking at the tensors
//   (torch's default for ops without one reads every tensor's requires_grad, a cache miss each).
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include "fused_op.h"

namespace lrfuse {
namespace {

// Tensors written per parallel chunk: each bump touches a counter of its own, often a cache miss.
constexpr int64_t kBumpGrain = 512;

// What the op writes, as it is on the stack: tensor lists, and the optional `stats` tensor
// (None when not asked for).
std::vector<c10::IValue> written_args(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack.size() - arguments.size();
  std::vector<c10::IValue> written;
  for (size_t a = 0; a < arguments.size(); ++a) {
    const auto* alias = arguments[a].alias_info();
    if (alias != nullptr && alias->isWrite() && !stack[first + a].isNone()) written.push_back(stack[first + a]);
  }
  return written;
}

void refuse_graph(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    auto refuse = [&](const at::Tensor& t) {
      TORCH_CHECK(!t.requires_grad(), op.schema().name(),
                  ": a tensor it writes requires grad, and the update is not differentiable; "
                  "call it under torch.no_grad() (an optimizer's step does)");
    };
    for (const c10::IValue& arg : written_args(op, *stack)) {
      if (arg.isTensor()) refuse(arg.toTensor());
      else for (const c10::IValue& t : arg.toListRef()) refuse(t.toTensor());
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void bump(const at::Tensor& t) {
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->version_counter().enabled()) impl->bump_version();  // inference tensors keep none
}

void bump_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const std::vector<c10::IValue> written = written_args(op, *stack);  // before the call consumes the stack
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const c10::IValue& arg : written) {
    if (arg.isTensor()) {
      bump(arg.toTensor());
      continue;
    }
    const auto tensors = arg.toListRef();
    at::parallel_for(0, static_cast<int64_t>(tensors.size()), kBumpGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) bump(tensors[i].toTensor());
    });
  }
}

}  // namespace
}  // namespace lrfuse

TORCH_LIBRARY_IMPL(lrfuse, Autograd, m) {
#define LRFUSE_NO_GRAPH(Rule) \
  m.impl(lrfuse::op_name<lrfuse::Rule>().c_str(), torch::CppFunction::makeFromBoxedFunction<&lrfuse::refuse_graph>());
  LRFUSE_RULES(LRFUSE_NO_GRAPH)
#undef LRFUSE_NO_GRAPH
}

TORCH_LIBRARY_IMPL(lrfuse, ADInplaceOrView, m) {
#define LRFUSE_BUMP(Rule) \
  m.impl(lrfuse::op_name<lrfuse::Rule>().c_str(), torch::CppFunction::makeFromBoxedFunction<&lrfuse::bump_written>());
  LRFUSE_RULES(LRFUSE_BUMP)
#undef LRFUSE_BUMP
}
