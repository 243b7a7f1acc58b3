// pybind11 module diffrt.kernels._C: the compiled kernels, with no torch dependency.
//
// Tensors arrive as raw addresses (Python ints from tensor.data_ptr(); 0 for an absent
// tensor), sizes, dtype codes (0 fp32, 1 fp16, 2 bf16) and, for CUDA, a stream handle (int
// from torch.cuda.current_stream().cuda_stream). Validation of shapes and devices is the
// launcher's job (kernels/launch.py); these functions trust it.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "solver_step.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef DIFFRT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;

namespace {

template <class P>
P* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<P*>(address);
}

diffrt::StepArgs make_args(std::uintptr_t x, std::uintptr_t cond, std::uintptr_t uncond, std::uintptr_t history,
                           std::uintptr_t noise, std::uintptr_t out, std::uintptr_t table, std::uintptr_t itable,
                           std::uintptr_t step, int64_t numel, int64_t n_steps, int64_t n_noise, int n_out, int n_slots) {
  if (x == 0 || cond == 0 || out == 0 || table == 0 || itable == 0 || step == 0) {
    throw std::invalid_argument("solver_step: x, cond, out, table, itable and step must not be null");
  }
  diffrt::StepArgs a;
  a.x = as_ptr<const void>(x);
  a.cond = as_ptr<const void>(cond);
  a.uncond = as_ptr<const void>(uncond);
  a.history = as_ptr<void>(history);
  a.noise = as_ptr<const void>(noise);
  a.out = as_ptr<void>(out);
  a.table = as_ptr<const float>(table);
  a.itable = as_ptr<const int32_t>(itable);
  a.step = as_ptr<const int64_t>(step);
  a.numel = numel;
  a.n_steps = n_steps;
  a.n_noise = noise == 0 ? 0 : n_noise;
  a.n_out = n_out;
  a.n_slots = n_slots;
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "diffrt compiled kernels (C++ CPU with OpenMP, CUDA when built with it); raw pointers, no torch headers";
#ifdef DIFFRT_WITH_CUDA
  m.attr("HAVE_CUDA") = true;
  m.attr("CUDA_ARCHS") = DIFFRT_CUDA_ARCHS;
#else
  m.attr("HAVE_CUDA") = false;
  m.attr("CUDA_ARCHS") = "";
#endif
#ifdef _OPENMP
  m.attr("HAVE_OPENMP") = true;
#else
  m.attr("HAVE_OPENMP") = false;
#endif
  m.attr("MAX_SLOTS") = diffrt::kMaxSlots;

  m.def(
      "solver_step_cpu",
      [](std::uintptr_t x, std::uintptr_t cond, std::uintptr_t uncond, std::uintptr_t history, std::uintptr_t noise,
         std::uintptr_t out, std::uintptr_t table, std::uintptr_t itable, std::uintptr_t step, int64_t numel,
         int64_t n_steps, int64_t n_noise, int n_out, int n_slots, int x_dtype, int model_dtype, int threads,
         std::uintptr_t scaled, double scale, int scaled_copies, bool advance) {
        auto args = make_args(x, cond, uncond, history, noise, out, table, itable, step, numel, n_steps,
                              n_noise, n_out, n_slots);
        args.scaled = as_ptr<void>(scaled);
        args.scale = static_cast<float>(scale);
        args.scaled_copies = scaled_copies;
        diffrt::solver_step_cpu(args, x_dtype, model_dtype, threads);
        if (advance) ++*as_ptr<int64_t>(step);  // after a step that did not throw
      },
      py::arg("x"), py::arg("cond"), py::arg("uncond"), py::arg("history"), py::arg("noise"), py::arg("out"),
      py::arg("table"), py::arg("itable"), py::arg("step"), py::arg("numel"), py::arg("n_steps"), py::arg("n_noise"),
      py::arg("n_out"), py::arg("n_slots"), py::arg("x_dtype"), py::arg("model_dtype"), py::arg("threads") = 0,
      py::arg("scaled") = 0, py::arg("scale") = 1.0, py::arg("scaled_copies") = 1, py::arg("advance") = false,
      py::call_guard<py::gil_scoped_release>(),
      "Fused solver step on host memory (OpenMP). Raises ValueError on a bad step index or row. `scaled` (an "
      "address, 0: none) also receives out * scale (the next model input), `scaled_copies` times one after the "
      "other; `advance` adds 1 to the step index.");

  m.def(
      "solver_step_cuda",
      [](std::uintptr_t x, std::uintptr_t cond, std::uintptr_t uncond, std::uintptr_t history, std::uintptr_t noise,
         std::uintptr_t out, std::uintptr_t table, std::uintptr_t itable, std::uintptr_t step, int64_t numel,
         int64_t n_steps, int64_t n_noise, int n_out, int n_slots, int x_dtype, int model_dtype, std::uintptr_t stream) {
#ifdef DIFFRT_WITH_CUDA
        const auto args = make_args(x, cond, uncond, history, noise, out, table, itable, step, numel, n_steps,
                                    n_noise, n_out, n_slots);
        const int status = diffrt::solver_step_cuda(args, x_dtype, model_dtype, as_ptr<void>(stream));
        if (status != 0) {
          throw std::runtime_error(std::string("solver_step_cuda: launch failed with CUDA error ") +
                                   std::to_string(status) + " (" +
                                   cudaGetErrorString(static_cast<cudaError_t>(status)) + ")");
        }
#else
        (void)x, (void)cond, (void)uncond, (void)history, (void)noise, (void)out, (void)table, (void)itable;
        (void)step, (void)numel, (void)n_steps, (void)n_noise, (void)n_out, (void)n_slots, (void)x_dtype;
        (void)model_dtype, (void)stream;
        throw std::runtime_error("diffrt.kernels._C was built without CUDA (no nvcc at build time, or DIFFRT_CUDA=0)");
#endif
      },
      py::arg("x"), py::arg("cond"), py::arg("uncond"), py::arg("history"), py::arg("noise"), py::arg("out"),
      py::arg("table"), py::arg("itable"), py::arg("step"), py::arg("numel"), py::arg("n_steps"), py::arg("n_noise"),
      py::arg("n_out"), py::arg("n_slots"), py::arg("x_dtype"), py::arg("model_dtype"), py::arg("stream") = 0,
      py::call_guard<py::gil_scoped_release>(),
      "Fused solver step on device memory, launched on `stream`; the step index is read on the device. "
      "A bad step index or row writes NaN to out.");
}
