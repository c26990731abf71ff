// The oneDNN-prepacked fp32 linear (model/cpu_linear.py) as an op of this library, for the
// compiled step. Inductor cannot lower mkldnn::_linear_pointwise on a weight that is a
// graph input, so the graph calls an opaque op instead; written in Python
// (torch.library.custom_op) that op cost ~23 us a call in wrapping alone, about 0.75 ms of a
// tiny Llama's decode step. Here the call goes straight through the dispatcher to oneDNN's
// kernel, with the same arguments the eager path passes.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

namespace palm_cpu {
namespace {

// x [M, K] fp32, packed: the weight as mkldnn::_reorder_linear_weight laid it out -> [M, N].
at::Tensor prepacked_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, c10::IValue(), c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<at::Scalar>>()),
                          c10::IValue(std::string(""))};
  op.callBoxed(&stack);
  at::Tensor out = stack[0].toTensor();
  TORCH_CHECK(out.dim() == 2 && out.size(1) == out_features, "prepacked_linear: the weight gives ",
              out.sizes(), ", not ", out_features, " outputs per row");
  return out;
}

}  // namespace
}  // namespace palm_cpu

TORCH_LIBRARY_FRAGMENT(palm_cpu, m) {
  m.def("prepacked_linear(Tensor x, Tensor packed, int out_features) -> Tensor");
}

// The packed weight is an opaque oneDNN tensor: calls dispatch on its key, MkldnnCPU.
TORCH_LIBRARY_IMPL(palm_cpu, MkldnnCPU, m) {
  m.impl("prepacked_linear", &palm_cpu::prepacked_linear);
}
