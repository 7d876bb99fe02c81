#include "checks.h"

#include <ATen/MemoryOverlap.h>

#include <algorithm>

namespace lrfuse {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_like_param(const FusedArgs& a, const char* name, const at::Tensor& t, size_t i) {
  const at::Tensor& p = a.params[i];
  TORCH_CHECK(t.defined(), a.op, ": ", name, "[", i, "] is undefined; pass a tensor shaped like params[", i, "]");
  TORCH_CHECK(t.layout() == at::kStrided, a.op, ": ", name, "[", i, "] is sparse; lrfuse does not support sparse gradients ",
              "or state (for sparse gradients use torch.optim.SparseAdam)");
  TORCH_CHECK(t.sizes() == p.sizes(), a.op, ": ", name, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", p.sizes(), "; they must match");
  TORCH_CHECK(t.scalar_type() == p.scalar_type(), a.op, ": ", name, "[", i, "] is ", t.scalar_type(),
              " but params[", i, "] is ", p.scalar_type(), "; cast it to the parameter's dtype");
  TORCH_CHECK(t.device() == p.device(), a.op, ": ", name, "[", i, "] is on ", t.device(),
              " but params[", i, "] is on ", p.device(), "; move it to the parameter's device");
}

// A written tensor (parameter or state) must own each of its elements, or one would be written
// many times.
void check_owns_elements(const FusedArgs& a, const char* name, const at::Tensor& t, size_t i) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, a.op, ": ", name, "[", i,
              "] has overlapping memory (an expanded view); give it memory of its own (e.g. .clone())");
}

void check_written(const FusedArgs& a, const char* name, const at::Tensor& t, size_t i) {
  check_like_param(a, name, t, i);
  check_owns_elements(a, name, t, i);
}

void check_scalar(const FusedArgs& a, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, a.op, ": ", name,
              " must be a one-element float32 tensor, got ", t.scalar_type(), " with ", t.numel(), " elements");
  TORCH_CHECK(t.device() == device, a.op, ": ", name, " is on ", t.device(), " but params are on ",
              device, "; move it to the parameters' device");
}

// torch keeps `step` in float32, or float64 under torch.set_default_dtype(torch.float64).
void check_step(const FusedArgs& a, const at::Tensor& t, size_t i, const at::Device& device) {
  TORCH_CHECK(t.numel() == 1 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble), a.op,
              ": steps[", i, "] must be a one-element float32 or float64 tensor, got ", t.scalar_type(), " with ",
              t.numel(), " elements");
  TORCH_CHECK(t.device() == device, a.op, ": steps[", i, "] is on ", t.device(), " but params are on ", device,
              "; move it to the parameters' device");
}

}  // namespace

void check_call_args(const FusedArgs& a) {
  const size_t n = a.params.size();
  auto check_len = [&](const char* name, size_t len) {
    TORCH_CHECK(len == n, a.op, ": ", name, " has ", len, " entries but params has ", n,
                "; pass one per parameter");
  };
  check_len("grads", a.grads.size());
  for (const auto& [name, list] : a.states) check_len(name, list.size());
  for (const auto& [name, list] : a.optional_states)
    TORCH_CHECK(list.empty() || list.size() == n, a.op, ": ", name, " has ", list.size(),
                " entries; pass none (feature off) or one per parameter (", n, ")");
  if (a.has_steps) check_len("steps", a.steps.size());
  check_len("group_of", a.group_of.size());

  TORCH_CHECK(a.hyper.scalar_type() == at::kDouble && a.hyper.dim() == 2 &&
                  a.hyper.size(1) == a.hyper_columns && a.hyper.is_contiguous(),
              a.op, ": hyper must be a contiguous float64 table of shape (groups, ", a.hyper_columns,
              "), got ", a.hyper.scalar_type(), " of shape ", a.hyper.sizes());
  if (a.stats) {
    const at::Tensor& t = *a.stats;
    TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 2 && t.size(0) == a.hyper.size(0) &&
                    t.size(1) == a.stats_columns && t.is_contiguous(),
                a.op, ": stats must be a contiguous float64 table of shape (", a.hyper.size(0), ", ", a.stats_columns,
                "), one row per row of hyper, got ", t.scalar_type(), " of shape ", t.sizes());
    TORCH_CHECK(t.device() == a.hyper.device(), a.op, ": stats is on ", t.device(), " but hyper is on ",
                a.hyper.device(), "; put it beside hyper");
  }
  if (n == 0) return;

  const at::Device device = a.params[0].device();
  TORCH_CHECK(a.hyper.device() == device, a.op, ": hyper is on ", a.hyper.device(),
              " but params are on ", device, "; build the table on the parameters' device");
  if (a.grad_scale) check_scalar(a, "grad_scale", *a.grad_scale, device);
  if (a.found_inf) check_scalar(a, "found_inf", *a.found_inf, device);
}

void check_tensor(const FusedArgs& a, size_t i) {
  const at::Tensor& p = a.params[i];
  const at::Device device = a.params[0].device();
  TORCH_CHECK(p.defined() && p.layout() == at::kStrided, a.op, ": params[", i, "] must be a dense tensor");
  TORCH_CHECK(!p.is_complex(), a.op, ": params[", i, "] is complex (", p.scalar_type(),
              "); pass torch.view_as_real of the parameter, its gradient and its state");
  TORCH_CHECK(supported_dtype(p.scalar_type()), a.op, ": params[", i, "] is ", p.scalar_type(),
              "; supported dtypes are float32, float64, float16 and bfloat16");
  TORCH_CHECK(p.device() == device, a.op, ": params[", i, "] is on ", p.device(), " but params[0] is on ",
              device, "; all tensors of one call must share a device (call once per device)");
  TORCH_CHECK(a.group_of[i] >= 0 && a.group_of[i] < a.hyper.size(0), a.op, ": group_of[", i, "] is ",
              a.group_of[i], " but hyper has ", a.hyper.size(0), " rows");
  check_owns_elements(a, "params", p, i);
  check_like_param(a, "grads", a.grads[i], i);
  for (const auto& [name, list] : a.states) check_written(a, name, list[i], i);
  for (const auto& [name, list] : a.optional_states)
    if (!list.empty()) check_written(a, name, list[i], i);
  if (a.has_steps) check_step(a, a.steps[i], i, device);
}

void check_distinct(const FusedArgs& a) {
  // A parameter passed twice would be updated twice.
  std::vector<std::pair<const void*, size_t>> starts;
  starts.reserve(a.params.size());
  for (size_t i = 0; i < a.params.size(); ++i)
    if (a.params[i].numel() > 0) starts.emplace_back(a.params[i].data_ptr(), i);
  std::sort(starts.begin(), starts.end());
  for (size_t k = 1; k < starts.size(); ++k)
    TORCH_CHECK(starts[k].first != starts[k - 1].first, a.op, ": params[", starts[k - 1].second,
                "] and params[", starts[k].second, "] share memory; pass each parameter once");
}

void check_fused_args(const FusedArgs& a) {
  check_call_args(a);
  for (size_t i = 0; i < a.params.size(); ++i) check_tensor(a, i);
  check_distinct(a);
}

}  // namespace lrfuse
