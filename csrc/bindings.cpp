// pybind11 bindings of the torch-free core. Buffers arrive through DLPack.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "array_arg.h"
#include "build_info.h"
#include "core/common.h"
#include "core/meta_step_grid.h"
#include "cpu/adam.h"
#include "cpu/meta_step_cpu.h"
#include "cpu/meta_step_plan.h"
#if defined(PYMAML_WITH_CUDA)
#include "cuda/meta_step_cuda.h"
#endif
#include "pymaml_build_config.h"

namespace py = pybind11;
using pymaml::ArrayArg;

namespace {

std::vector<std::string> split_archs(const std::string& archs) {
  std::vector<std::string> out;
  std::stringstream stream(archs);
  std::string item;
  while (std::getline(stream, item, ';')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

py::dict build_info() {
  py::dict info;
  info["compiler"] = pymaml::compiler_description();
  info["build_type"] = std::string(PYMAML_BUILD_TYPE);
  info["flags"] = std::string(PYMAML_CXX_FLAGS);
  info["openmp"] = pymaml::openmp_enabled();
  info["cuda_archs"] = split_archs(PYMAML_CUDA_ARCHS);
  info["cpu_level"] = pymaml::cpu_level();
  info["cpu_levels"] = pymaml::cpu_levels();
  info["cpu_levels_compiled"] = pymaml::compiled_cpu_levels();
  return info;
}

pymaml::Loss parse_loss(const std::string& name) {
  if (name == "mse") return pymaml::Loss::mse;
  if (name == "cross_entropy") return pymaml::Loss::cross_entropy;
  throw py::value_error("loss must be 'mse' or 'cross_entropy', got '" + name + "'");
}

// The encoding of a network's layers (pymaml/ops/network.py writes it): the input shape
// [C, H, W], then kLayerInts integers per layer, in this order, and one float per layer in
// `constants`. The kinds are LayerKind's values (layer_kinds()), the activations Activation's.
constexpr int kLayerInts = 8;
enum LayerField { kKind, kOut, kKernel, kStride, kPadding, kBias, kAffine, kActivation };

py::dict layer_kinds() {
  py::dict kinds;
#define PYMAML_LAYER_NAME(name, Type) kinds[#name] = int(pymaml::LayerKind::name);
  PYMAML_LAYER_KINDS(PYMAML_LAYER_NAME)
#undef PYMAML_LAYER_NAME
  return kinds;
}

pymaml::Network decode_network(const std::vector<int>& layers, const std::vector<double>& constants,
                               pymaml::Loss loss) {
  const size_t count = layers.size() < 3 ? 0 : (layers.size() - 3) / kLayerInts;
  if (layers.size() < 3 + kLayerInts || (layers.size() - 3) % kLayerInts != 0) {
    throw py::value_error("layers must be the input shape [C, H, W] and " + std::to_string(kLayerInts) +
                          " integers per layer, got " + std::to_string(layers.size()) + " integers");
  }
  if (constants.size() != count) {
    throw py::value_error("layer_constants must hold one value per layer: " + std::to_string(count) + ", got " +
                          std::to_string(constants.size()));
  }
  if (count > size_t(pymaml::kMaxNetworkLayers)) {
    throw py::value_error("the network has " + std::to_string(count) + " layers; the fused kernel takes at most " +
                          std::to_string(pymaml::kMaxNetworkLayers));
  }
  constexpr int kinds = 0
#define PYMAML_LAYER_COUNT(name, Type) +1
      PYMAML_LAYER_KINDS(PYMAML_LAYER_COUNT)
#undef PYMAML_LAYER_COUNT
      ;
  std::vector<pymaml::Layer> decoded(count);
  for (size_t i = 0; i < count; ++i) {
    const int* f = layers.data() + 3 + i * kLayerInts;
    if (f[kKind] < 0 || f[kKind] >= kinds) throw py::value_error("layer " + std::to_string(i) + " has an unknown kind");
    if (f[kActivation] < int(pymaml::Activation::none) || f[kActivation] > int(pymaml::Activation::elu)) {
      throw py::value_error("layer " + std::to_string(i) + " has an unknown activation");
    }
    pymaml::Layer& L = decoded[i];
    L.kind = static_cast<pymaml::LayerKind>(f[kKind]);
    L.channels_out = f[kOut];
    L.kernel = f[kKernel];
    L.stride = f[kStride];
    L.padding = f[kPadding];
    L.bias = f[kBias] != 0;
    L.affine = f[kAffine] != 0;
    L.activation = static_cast<pymaml::Activation>(f[kActivation]);
    L.constant = constants[i];
    // A BatchNorm's `out` is the rows of its γ and β (pymaml.nn.PerStepBatchNorm2d: one per inner
    // step); 0 or 1: one row.
    if (L.kind == pymaml::LayerKind::batch_norm) {
      L.rows = f[kOut] > 1 ? f[kOut] : 1;
      L.channels_out = 0;
    }
  }
  pymaml::Network net;
  if (!pymaml::make_network(decoded.data(), int(count), layers[0], layers[1], layers[2], loss, &net)) {
    throw py::value_error("the layers do not form a network the fused kernel takes: each layer must accept its "
                          "input's shape (positive sizes, a Flatten before a Linear on an image, a kernel no larger "
                          "than its padded input), and the network must have parameters");
  }
  return net;
}

// The network of a call, from its encoding (pymaml/ops/meta_step/network.py); an MLP is encoded
// like any other network.
pymaml::Network build_network(const std::string& loss, const std::vector<int>& layers,
                              const std::vector<double>& constants) {
  return decode_network(layers, constants, parse_loss(loss));
}


void check_labels(const ArrayArg& labels, int classes) {
  const int64_t* data = labels.data<int64_t>();
  for (int64_t i = 0, n = labels.numel(); i < n; ++i) {
    if (data[i] < 0 || data[i] >= classes) {
      throw py::value_error(labels.name() + " has label " + std::to_string(data[i]) + " outside [0, " +
                            std::to_string(classes) + ")");
    }
  }
}

template <class T>
void check_finite_values(const ArrayArg& array) {
  const T* data = array.data<T>();
  bool finite = true;
  for (int64_t i = 0, n = array.numel(); i < n; ++i) finite &= std::isfinite(data[i]);
  if (!finite) throw py::value_error(array.name() + " contains NaN or Inf");
}

struct BatchShape {
  int tasks, support_points, query_points;
};

// The meta-batch against the network: [T, K, n_0] inputs, [T, K, n_L] targets of theta's dtype (MSE)
// or [T, K] int64 labels in range (cross-entropy), and on the CPU finite inputs.
BatchShape check_batch(const pymaml::Network& spec, DLDataType real, int steps, const ArrayArg& support_x,
                       const ArrayArg& support_y, const ArrayArg& query_x, const ArrayArg& query_y,
                       DLDeviceType device) {
  support_x.require_ndim(3, "[tasks, support points, inputs]");
  const int tasks = int(support_x.dim(0)), Ks = int(support_x.dim(1));
  if (tasks < 1) throw py::value_error("support_x has no tasks");
  support_x.require_shape({tasks, Ks, spec.inputs()}, "[tasks, support points, inputs]");
  query_x.require_ndim(3, "[tasks, query points, inputs]");
  const int Kq = int(query_x.dim(1));
  query_x.require_shape({tasks, Kq, spec.inputs()}, "[tasks, query points, inputs]");
  if (steps > 0 && Ks < 1) throw py::value_error("support_x has no points per task; the inner loop needs at least one");
  if (Kq < 1) throw py::value_error("query_x has no points per task");
  support_x.require_dtype(real, "it must match theta");
  query_x.require_dtype(real, "it must match theta");
  const int outputs = spec.outputs();
  const bool labels = spec.loss == pymaml::Loss::cross_entropy;
  if (labels) {
    const DLDataType int64{kDLInt, 64, 1};
    support_y.require_dtype(int64, "class labels for cross_entropy");
    query_y.require_dtype(int64, "class labels for cross_entropy");
    support_y.require_shape({tasks, Ks}, "[tasks, support points] class labels");
    query_y.require_shape({tasks, Kq}, "[tasks, query points] class labels");
    if (device == kDLCPU) {  // device memory is not read here; the Python side checks labels
      check_labels(support_y, outputs);
      check_labels(query_y, outputs);
    }
  } else {
    support_y.require_dtype(real, "mse targets match theta");
    query_y.require_dtype(real, "mse targets match theta");
    support_y.require_shape({tasks, Ks, outputs}, "[tasks, support points, outputs]");
    query_y.require_shape({tasks, Kq, outputs}, "[tasks, query points, outputs]");
  }
  if (device == kDLCPU) {  // a NaN or Inf in the data would silently poison every gradient
    const bool f32 = real.bits == 32;
    for (const ArrayArg* array : {&support_x, &support_y, &query_x, &query_y}) {
      if (labels && (array == &support_y || array == &query_y)) continue;
      if (f32) {
        check_finite_values<float>(*array);
      } else {
        check_finite_values<double>(*array);
      }
    }
  }
  return {tasks, Ks, Kq};
}

// The checked arguments of a meta-step call, on the CPU or on one CUDA device.
struct MetaStepCall {
  pymaml::Network spec;
  pymaml::MetaStepShape shape{};
  int tasks = 0;
  bool is_f32 = true;
  std::vector<std::unique_ptr<ArrayArg>> arrays;  // theta, lrs, step_weights, sx, sy, qx, qy, outputs...
  std::unique_ptr<ArrayArg> grad_lrs;
  // grad_theta given as a list of buffers (the parameters' own .grad): the launcher writes into
  // `gathered` and scatter_grad copies it out.
  std::vector<std::unique_ptr<ArrayArg>> grad_parts;
  mutable std::vector<unsigned char> gathered;

  const ArrayArg& operator[](size_t i) const { return *arrays[i]; }

  template <class T>
  pymaml::MetaBatch<T> batch() const {
    const bool labels = spec.loss == pymaml::Loss::cross_entropy;
    const MetaStepCall& a = *this;
    return {tasks, a[0].data<T>(), a[1].data<T>(), a[2].data<T>(), a[3].data<T>(),
            labels ? nullptr : a[4].data<T>(), labels ? a[4].data<int64_t>() : nullptr, a[5].data<T>(),
            labels ? nullptr : a[6].data<T>(), labels ? a[6].data<int64_t>() : nullptr};
  }

  template <class T>
  pymaml::MetaResult<T> result() const {
    const MetaStepCall& a = *this;
    T* grad_theta = grad_parts.size() == 1 ? grad_parts[0]->data<T>() : reinterpret_cast<T*>(gathered.data());
    return {a[7].data<T>(), a[8].data<T>(), a[9].data<T>(), a[10].data<T>(), grad_theta,
            grad_lrs ? grad_lrs->data<T>() : nullptr};
  }

  template <class T>
  void scatter_grad() const {
    if (grad_parts.size() == 1) return;
    const T* flat = reinterpret_cast<const T*>(gathered.data());
    for (const auto& part : grad_parts) {
      std::copy_n(flat, part->numel(), part->data<T>());
      flat += part->numel();
    }
  }
};

// grad_theta: one buffer of P values, or a list of buffers whose sizes add up to P (in order).
void take_grad_parts(py::handle object, DLDeviceType device, MetaStepCall& call) {
  if (py::isinstance<py::list>(object) || py::isinstance<py::tuple>(object)) {
    int index = 0;
    for (py::handle part : object) {
      call.grad_parts.push_back(std::make_unique<ArrayArg>(part, "grad_theta[" + std::to_string(index++) + "]", device));
    }
    if (call.grad_parts.empty()) throw py::value_error("grad_theta must not be an empty list");
  } else {
    call.grad_parts.push_back(std::make_unique<ArrayArg>(object, "grad_theta", device));
  }
}

MetaStepCall check_meta_step(const std::vector<std::pair<py::handle, const char*>>& buffers, py::handle grad_theta_obj,
                             py::handle grad_lrs_obj, const std::string& loss, const std::vector<int>& layers,
                             const std::vector<double>& layer_constants, bool first_order,
                             bool all_step_losses, DLDeviceType device) {
  MetaStepCall call;
  pymaml::Network& spec = call.spec;
  spec = build_network(loss, layers, layer_constants);
  for (const auto& [object, name] : buffers) call.arrays.push_back(std::make_unique<ArrayArg>(object, name, device));
  if (!grad_lrs_obj.is_none()) call.grad_lrs = std::make_unique<ArrayArg>(grad_lrs_obj, "grad_lrs", device);
  take_grad_parts(grad_theta_obj, device, call);
  const MetaStepCall& a = call;
  const ArrayArg &theta = a[0], &lrs = a[1], &step_weights = a[2], &support_x = a[3], &support_y = a[4];
  const ArrayArg &query_x = a[5], &query_y = a[6];
  for (size_t i = 1; i < call.arrays.size(); ++i) {
    if (a[i].device_id() != theta.device_id()) {
      throw py::value_error(a[i].name() + " is on device " + std::to_string(a[i].device_id()) + " but theta is on " +
                            std::to_string(theta.device_id()));
    }
  }
  const bool is_f32 = theta.is(kDLFloat, 32), is_f64 = theta.is(kDLFloat, 64);
  if (!is_f32 && !is_f64) {
    throw py::type_error("theta has dtype " + pymaml::dtype_name(theta.dtype()) + " but must be float32 or float64");
  }
  call.is_f32 = is_f32;
  const DLDataType real = theta.dtype();
  const int64_t P = spec.num_params;
  theta.require_shape({P}, "the flattened network parameters");
  lrs.require_ndim(2, "[steps, parameters]");
  const int S = int(lrs.dim(0));
  lrs.require_shape({S, P}, "[steps, parameters]");
  step_weights.require_shape({S}, "one weight per inner step");
  const BatchShape batch = check_batch(spec, real, S, support_x, support_y, query_x, query_y, device);
  const int tasks = batch.tasks;
  for (size_t i : {1, 2, 7, 8, 9, 10}) a[i].require_dtype(real, "it must match theta");
  const ArrayArg &meta_loss = a[7], &task_losses = a[8], &pre_losses = a[9], &step_losses = a[10];
  if (meta_loss.numel() != 1) throw py::value_error("meta_loss must hold exactly one value");
  task_losses.require_shape({tasks}, "one loss per task");
  pre_losses.require_shape({tasks}, "one loss per task");
  step_losses.require_shape({S}, "one loss per inner step");
  if (call.grad_parts.size() == 1) {
    call.grad_parts[0]->require_shape({P}, "the flattened network parameters");
  } else {
    int64_t total = 0;
    for (const auto& part : call.grad_parts) total += part->numel();
    if (total != P) {
      throw py::value_error("the grad_theta buffers hold " + std::to_string(total) + " values; the network has " +
                            std::to_string(P) + " parameters");
    }
    call.gathered.resize(size_t(P) * (real.bits / 8));
  }
  for (const auto& part : call.grad_parts) {
    part->require_dtype(real, "it must match theta");
    if (part->device_id() != theta.device_id()) throw py::value_error(part->name() + " is not on theta's device");
  }
  if (call.grad_lrs) {
    call.grad_lrs->require_dtype(real, "it must match theta");
    call.grad_lrs->require_shape({S, P}, "[steps, parameters]");
  }
  call.shape = pymaml::MetaStepShape{S, batch.support_points, batch.query_points, first_order, call.grad_lrs != nullptr, all_step_losses};
  call.tasks = tasks;
  return call;
}

#define PYMAML_META_STEP_BUFFERS                                                                          \
  {{theta, "theta"}, {lrs, "lrs"}, {step_weights, "step_weights"}, {support_x, "support_x"},             \
   {support_y, "support_y"}, {query_x, "query_x"}, {query_y, "query_y"}, {meta_loss, "meta_loss"},       \
   {task_losses, "task_losses"}, {pre_losses, "pre_losses"}, {step_losses, "step_losses"}}

using pymaml::AdamSettings;

// Adam's buffers as the one-shot call takes them (csrc/cpu/adam.h has the update).
struct AdamArgs {
  std::vector<std::unique_ptr<ArrayArg>> params, exp_avg, exp_avg_sq;

  template <class T>
  void apply(const std::vector<std::unique_ptr<ArrayArg>>& grads, const AdamSettings& settings) const {
    for (size_t i = 0; i < params.size(); ++i) {
      pymaml::adam_update<T>(settings, params[i]->numel(), grads[i]->data<T>(), params[i]->data<T>(),
                             exp_avg[i]->data<T>(), exp_avg_sq[i]->data<T>());
    }
  }
};

std::vector<std::unique_ptr<ArrayArg>> buffer_list(py::handle object, const std::string& name) {
  std::vector<std::unique_ptr<ArrayArg>> out;
  int index = 0;
  for (py::handle part : object) out.push_back(std::make_unique<ArrayArg>(part, name + "[" + std::to_string(index++) + "]"));
  return out;
}

// Adam's buffers: one parameter and two moments per gradient buffer, each of `real` dtype and of
// its gradient's size.
std::unique_ptr<AdamArgs> check_adam_buffers(const std::vector<std::unique_ptr<ArrayArg>>& grads, DLDataType real,
                                             py::handle params, py::handle exp_avg, py::handle exp_avg_sq) {
  auto adam = std::make_unique<AdamArgs>();
  adam->params = buffer_list(params, "adam_params");
  adam->exp_avg = buffer_list(exp_avg, "adam_exp_avg");
  adam->exp_avg_sq = buffer_list(exp_avg_sq, "adam_exp_avg_sq");
  if (grads.size() != adam->params.size() || adam->exp_avg.size() != adam->params.size() ||
      adam->exp_avg_sq.size() != adam->params.size()) {
    throw py::value_error("the Adam update needs grad_theta, adam_params, adam_exp_avg and adam_exp_avg_sq as lists of "
                          "one buffer per parameter");
  }
  for (size_t i = 0; i < adam->params.size(); ++i) {
    for (const ArrayArg* buffer : {adam->params[i].get(), adam->exp_avg[i].get(), adam->exp_avg_sq[i].get()}) {
      buffer->require_dtype(real, "it must match theta");
      if (buffer->numel() != grads[i]->numel()) {
        throw py::value_error(buffer->name() + " holds " + std::to_string(buffer->numel()) + " values, its gradient " +
                              std::to_string(grads[i]->numel()));
      }
    }
  }
  return adam;
}

AdamSettings adam_settings(int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay) {
  if (step < 1) throw py::value_error("adam_step must be >= 1 (the step being taken), got " + std::to_string(step));
  if (!(lr >= 0) || !(beta1 >= 0 && beta1 < 1) || !(beta2 >= 0 && beta2 < 1) || !(eps >= 0) || !(weight_decay >= 0)) {
    throw py::value_error("invalid Adam hyperparameters");
  }
  return AdamSettings{step, lr, beta1, beta2, eps, weight_decay};
}

// The held meta-step (csrc/cpu/meta_step_plan.h) of buffers checked once here. The held buffers
// are DLPack views: their memory stays allocated while the plan lives, but a tensor given new
// storage or strides (.data =, set_, share_memory_) no longer uses them, so the caller checks
// every held tensor's data pointer, sizes and strides before each run (pymaml.backends.cpp._Plan)
// and builds a new plan when one changed. run() releases the GIL.
class PlanBinding {
 public:
  PlanBinding(const std::string& loss, const std::vector<int>& layers, const std::vector<double>& layer_constants,
              bool first_order, int steps,
          double inner_lr, py::handle params, py::handle grads, py::handle exp_avg, py::handle exp_avg_sq,
          py::handle adam_steps)
      : steps_(steps) {
    spec_ = build_network(loss, layers, layer_constants);
    if (steps < 0) throw py::value_error("steps must be >= 0, got " + std::to_string(steps));
    if (!std::isfinite(inner_lr)) throw py::value_error("inner_lr must be finite");
    params_ = buffer_list(params, "params");
    grads_ = buffer_list(grads, "grads");
    if (params_.empty() || params_.size() != grads_.size()) {
      throw py::value_error("params and grads must be lists of the same, non-zero length");
    }
    real_ = params_[0]->dtype();
    if (!params_[0]->is(kDLFloat, 32) && !params_[0]->is(kDLFloat, 64)) {
      throw py::type_error("params[0] has dtype " + pymaml::dtype_name(real_) + " but must be float32 or float64");
    }
    int64_t total = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      params_[i]->require_dtype(real_, "it must match params[0]");
      grads_[i]->require_dtype(real_, "it must match params[0]");
      if (grads_[i]->numel() != params_[i]->numel()) {
        throw py::value_error(grads_[i]->name() + " holds " + std::to_string(grads_[i]->numel()) + " values, its "
                              "parameter " + std::to_string(params_[i]->numel()));
      }
      total += params_[i]->numel();
    }
    if (total != spec_.num_params) {
      throw py::value_error("the params hold " + std::to_string(total) + " values; the network has " +
                            std::to_string(spec_.num_params) + " parameters");
    }
    pymaml::HeldAdam held_adam;
    if (!exp_avg.is_none()) {
      adam_ = check_adam_buffers(grads_, real_, params, exp_avg, exp_avg_sq);
      counters_ = buffer_list(adam_steps, "adam_steps");
      if (counters_.size() != params_.size()) throw py::value_error("adam_steps needs one counter per parameter");
      for (const auto& counter : counters_) {
        if (counter->numel() != 1 || !(counter->is(kDLFloat, 32) || counter->is(kDLFloat, 64))) {
          throw py::type_error(counter->name() + " must be one float32 or float64 value (torch's Adam step)");
        }
        held_adam.counters.push_back({counter->raw_data(), counter->is(kDLFloat, 32)});
      }
      held_adam.exp_avg = held(adam_->exp_avg);
      held_adam.exp_avg_sq = held(adam_->exp_avg_sq);
    }
    plan_ = std::make_unique<pymaml::MetaStepPlan>(spec_, real_.bits == 32, first_order, steps, inner_lr,
                                                   held(adam_ ? adam_->params : params_), held(grads_),
                                                   adam_ ? &held_adam : nullptr);
  }

  // losses: [T + 2] of the parameters' dtype: the meta-loss, the mean pre-adaptation loss, then
  // the per-task losses.
  void run(py::handle support_x, py::handle support_y, py::handle query_x, py::handle query_y, py::handle losses,
           int threads, double adam_lr, double adam_beta1, double adam_beta2, double adam_eps,
           double adam_weight_decay) {
    if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
    const ArrayArg sx(support_x, "support_x"), sy(support_y, "support_y"), qx(query_x, "query_x"),
        qy(query_y, "query_y"), out(losses, "losses");
    const BatchShape batch = check_batch(spec_, real_, steps_, sx, sy, qx, qy, kDLCPU);
    out.require_dtype(real_, "it must match the parameters");
    out.require_shape({batch.tasks + 2}, "the meta-loss, the mean pre-adaptation loss and one loss per task");
    // The step is validated now and taken from the counters under the plan's lock (a concurrent
    // run may advance them first).
    const AdamSettings adam = adam_ ? adam_settings(1, adam_lr, adam_beta1, adam_beta2, adam_eps, adam_weight_decay)
                                    : AdamSettings{};
    std::string error;
    {
      py::gil_scoped_release release;
      error = plan_->run(batch.tasks, batch.support_points, batch.query_points, sx.raw_data(), sy.raw_data(),
                         qx.raw_data(), qy.raw_data(), out.raw_data(), threads, adam);
    }
    if (!error.empty()) throw py::value_error(error);
  }

 private:
  static std::vector<pymaml::HeldBuffer> held(const std::vector<std::unique_ptr<ArrayArg>>& buffers) {
    std::vector<pymaml::HeldBuffer> out;
    for (const auto& buffer : buffers) out.push_back({buffer->raw_data(), buffer->numel()});
    return out;
  }

  pymaml::Network spec_;
  int steps_;
  DLDataType real_{};
  // The checked buffers, whose DLPack views keep their memory alive while the plan holds them.
  std::vector<std::unique_ptr<ArrayArg>> params_, grads_, counters_;
  std::unique_ptr<AdamArgs> adam_;
  std::unique_ptr<pymaml::MetaStepPlan> plan_;
};

void meta_step(py::handle theta, py::handle lrs, py::handle step_weights, py::handle support_x,
                   py::handle support_y, py::handle query_x, py::handle query_y, const std::vector<int>& layers,
                   const std::vector<double>& layer_constants, const std::string& loss, bool first_order,
                   py::handle meta_loss, py::handle task_losses, py::handle pre_losses, py::handle step_losses,
                   py::handle grad_theta, py::handle grad_lrs, int threads, bool all_step_losses, py::handle adam_params,
                   py::handle adam_exp_avg, py::handle adam_exp_avg_sq, int64_t adam_step, double adam_lr,
                   double adam_beta1, double adam_beta2, double adam_eps, double adam_weight_decay) {
  if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
  const MetaStepCall call = check_meta_step(PYMAML_META_STEP_BUFFERS, grad_theta, grad_lrs, loss, layers,
                                            layer_constants, first_order, all_step_losses, kDLCPU);
  std::unique_ptr<AdamArgs> adam;
  AdamSettings settings;
  if (!adam_params.is_none()) {
    adam = check_adam_buffers(call.grad_parts, call[0].dtype(), adam_params, adam_exp_avg, adam_exp_avg_sq);
    settings = adam_settings(adam_step, adam_lr, adam_beta1, adam_beta2, adam_eps, adam_weight_decay);
  }
  py::gil_scoped_release release;
  if (call.is_f32) {
    pymaml::meta_step_cpu<float>(call.spec, call.shape, call.batch<float>(), call.result<float>(), threads);
    call.scatter_grad<float>();
    if (adam) adam->apply<float>(call.grad_parts, settings);
  } else {
    pymaml::meta_step_cpu<double>(call.spec, call.shape, call.batch<double>(), call.result<double>(), threads);
    call.scatter_grad<double>();
    if (adam) adam->apply<double>(call.grad_parts, settings);
  }
}

// The CUDA launch's workspace, in values of theta's dtype: per block (the task workspace and the
// padded θ_0 and α) and per task (its results, read by the last block). Host arithmetic only, so
// that the launcher's block cap (pymaml/ops/meta_step.py) is testable without CUDA.
pymaml::GridLayout cuda_grid_layout(const std::vector<int>& layers, const std::vector<double>& layer_constants,
                                    int steps, int support_points, int query_points, bool lr_grad) {
  const pymaml::Network spec = build_network("mse", layers, layer_constants);
  if (steps < 0 || support_points < 0 || query_points < 0) {
    throw py::value_error("steps and point counts must be >= 0");
  }
  const pymaml::MetaStepShape shape{steps, support_points, query_points, false, lr_grad};
  return pymaml::grid_layout(spec, shape);
}

int64_t meta_step_cuda_workspace(const std::vector<int>& layers, const std::vector<double>& layer_constants,
                                 int tasks, int steps, int support_points, int query_points, bool lr_grad, int blocks) {
  const pymaml::GridLayout lay =
      cuda_grid_layout(layers, layer_constants, steps, support_points, query_points, lr_grad);
  return int64_t(blocks) * lay.block_stride + int64_t(tasks) * lay.per_task_stride;
}

py::tuple meta_step_cuda_workspace_parts(const std::vector<int>& layers, const std::vector<double>& layer_constants,
                                         int steps, int support_points, int query_points, bool lr_grad) {
  const pymaml::GridLayout lay =
      cuda_grid_layout(layers, layer_constants, steps, support_points, query_points, lr_grad);
  return py::make_tuple(lay.block_stride, lay.per_task_stride);
}

#if defined(PYMAML_WITH_CUDA)
void meta_step_cuda(py::handle theta, py::handle lrs, py::handle step_weights, py::handle support_x,
                        py::handle support_y, py::handle query_x, py::handle query_y, const std::vector<int>& layers,
                        const std::vector<double>& layer_constants, const std::string& loss, bool first_order,
                        py::handle meta_loss, py::handle task_losses, py::handle pre_losses, py::handle step_losses,
                        py::handle grad_theta, py::handle grad_lrs, py::handle workspace_obj, py::handle counter_obj,
                        uintptr_t stream, int blocks, py::handle labels_ok_obj, int threads_per_block,
                        bool all_step_losses) {
  const MetaStepCall call = check_meta_step(PYMAML_META_STEP_BUFFERS, grad_theta, grad_lrs, loss, layers,
                                            layer_constants, first_order, all_step_losses, kDLCUDA);
  if (call.grad_parts.size() != 1) throw py::value_error("grad_theta must be one buffer of CUDA memory");
  if (blocks < 1 || threads_per_block < 32 || threads_per_block > pymaml::kCudaThreadsPerBlock ||
      threads_per_block % 32) {
    throw py::value_error("blocks must be >= 1 and threads_per_block a multiple of 32 in [32, " +
                          std::to_string(pymaml::kCudaThreadsPerBlock) + "] (the kernel's launch bounds)");
  }
  const int device = call[0].device_id();
  const ArrayArg workspace(workspace_obj, "workspace", kDLCUDA), counter(counter_obj, "counter", kDLCUDA);
  workspace.require_dtype(call[0].dtype(), "it must match theta");
  const int64_t needed = pymaml::grid_workspace_elements(call.spec, call.shape, call.tasks, blocks);
  if (workspace.numel() < needed) {
    throw py::value_error("workspace holds " + std::to_string(workspace.numel()) + " values; this call needs " +
                          std::to_string(needed));
  }
  counter.require_dtype(DLDataType{kDLInt, 32, 1}, "an int32 counter, zero before the launch");
  counter.require_shape({1}, "one counter");
  const bool labels = call.spec.loss == pymaml::Loss::cross_entropy;
  std::unique_ptr<ArrayArg> labels_ok;
  if (labels) {
    if (labels_ok_obj.is_none()) throw py::value_error("cross_entropy needs labels_ok, one int32 for the label check");
    labels_ok = std::make_unique<ArrayArg>(labels_ok_obj, "labels_ok", kDLCUDA);
    labels_ok->require_dtype(DLDataType{kDLInt, 32, 1}, "one int32 the kernel sets to 1 when every label is in range");
    labels_ok->require_shape({1}, "one flag");
  }
  for (const ArrayArg* array : std::initializer_list<const ArrayArg*>{&workspace, &counter, labels_ok.get()}) {
    if (array && array->device_id() != device) {
      throw py::value_error(array->name() + " is on device " + std::to_string(array->device_id()) +
                            " but theta is on " + std::to_string(device));
    }
  }
  int* flag = labels_ok ? labels_ok->data<int>() : nullptr;
  const std::string error = call.is_f32
      ? pymaml::meta_step_cuda<float>(call.spec, call.shape, call.batch<float>(), call.result<float>(),
                                          workspace.data<float>(), counter.data<unsigned int>(), flag, device, blocks,
                                          threads_per_block, reinterpret_cast<void*>(stream))
      : pymaml::meta_step_cuda<double>(call.spec, call.shape, call.batch<double>(), call.result<double>(),
                                           workspace.data<double>(), counter.data<unsigned int>(), flag, device,
                                           blocks, threads_per_block, reinterpret_cast<void*>(stream));
  if (!error.empty()) throw std::runtime_error("pymaml::meta_step CUDA launch failed: " + error);
}
#endif

void hvp(py::handle theta_obj, py::handle v_obj, py::handle x_obj, py::handle y_obj, const std::vector<int>& layers,
         const std::vector<double>& layer_constants, const std::string& loss, py::handle hv_obj, py::handle grad_obj,
         int threads) {
  pymaml::Network spec;
  spec = build_network(loss, layers, layer_constants);
  if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
  const ArrayArg theta(theta_obj, "theta"), v(v_obj, "v"), x(x_obj, "x"), y(y_obj, "y"), hv(hv_obj, "hv");
  std::unique_ptr<ArrayArg> grad;
  if (!grad_obj.is_none()) grad = std::make_unique<ArrayArg>(grad_obj, "grad");
  const bool is_f32 = theta.is(kDLFloat, 32), is_f64 = theta.is(kDLFloat, 64);
  if (!is_f32 && !is_f64) {
    throw py::type_error("theta has dtype " + pymaml::dtype_name(theta.dtype()) + " but must be float32 or float64");
  }
  const DLDataType real = theta.dtype();
  const int64_t P = spec.num_params;
  theta.require_ndim(2, "[tasks, parameters]");
  const int tasks = int(theta.dim(0));
  if (tasks < 1) throw py::value_error("theta has no tasks");
  theta.require_shape({tasks, P}, "[tasks, parameters]");
  x.require_ndim(3, "[tasks, points, inputs]");
  const int points = int(x.dim(1));
  if (points < 1) throw py::value_error("x has no points per task");
  x.require_shape({tasks, points, spec.inputs()}, "[tasks, points, inputs]");
  for (const ArrayArg* a : {&v, &hv}) a->require_shape({tasks, P}, "[tasks, parameters]");
  for (const ArrayArg* a : {&v, &x, &hv}) a->require_dtype(real, "it must match theta");
  if (grad) {
    grad->require_shape({tasks, P}, "[tasks, parameters]");
    grad->require_dtype(real, "it must match theta");
  }
  const bool labels = spec.loss == pymaml::Loss::cross_entropy;
  if (labels) {
    y.require_dtype(DLDataType{kDLInt, 64, 1}, "class labels for cross_entropy");
    y.require_shape({tasks, points}, "[tasks, points] class labels");
    check_labels(y, spec.outputs());
  } else {
    y.require_dtype(real, "mse targets match theta");
    y.require_shape({tasks, points, spec.outputs()}, "[tasks, points, outputs]");
  }
  py::gil_scoped_release release;
  if (is_f32) {
    pymaml::hvp_cpu<float>(spec, tasks, points, theta.data<float>(), v.data<float>(), x.data<float>(),
                               labels ? nullptr : y.data<float>(), labels ? y.data<int64_t>() : nullptr,
                               hv.data<float>(), grad ? grad->data<float>() : nullptr, threads);
  } else {
    pymaml::hvp_cpu<double>(spec, tasks, points, theta.data<double>(), v.data<double>(), x.data<double>(),
                                labels ? nullptr : y.data<double>(), labels ? y.data<int64_t>() : nullptr,
                                hv.data<double>(), grad ? grad->data<double>() : nullptr, threads);
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymaml's torch-free C++ core";
  m.def("build_info", &build_info, "Compiler, flags, OpenMP, CPU levels and CUDA archs of this build.");
  m.def("layer_kinds", &layer_kinds, "The layer kinds' numbers in the `layers` encoding of a network.");
  m.attr("LAYER_INTS") = kLayerInts;
  m.def("set_cpu_level", &pymaml::set_cpu_level, py::arg("level"),
        "Run the CPU kernels built for `level` (one of build_info()['cpu_levels']) instead of the best one.");
  m.def("meta_step", &meta_step, py::kw_only(), py::arg("theta"), py::arg("lrs"), py::arg("step_weights"),
        py::arg("support_x"), py::arg("support_y"), py::arg("query_x"), py::arg("query_y"), py::arg("layers"),
        py::arg("layer_constants"), py::arg("loss"), py::arg("first_order"), py::arg("meta_loss"),
        py::arg("task_losses"), py::arg("pre_losses"), py::arg("step_losses"), py::arg("grad_theta"),
        py::arg("grad_lrs") = py::none(), py::arg("threads") = 1, py::arg("all_step_losses") = true,
        py::arg("adam_params") = py::none(), py::arg("adam_exp_avg") = py::none(),
        py::arg("adam_exp_avg_sq") = py::none(), py::arg("adam_step") = 0, py::arg("adam_lr") = 0.0,
        py::arg("adam_beta1") = 0.9, py::arg("adam_beta2") = 0.999, py::arg("adam_eps") = 1e-8,
        py::arg("adam_weight_decay") = 0.0,
        "The fused MAML meta-step of the network `layers` and `layer_constants` encode, over a batch of\n"
        "tasks, written into the output buffers.\n"
        "Inner loop θ_{s+1} = θ_s − lrs[s] ⊙ ∇L_support(θ_s); loss Σ_s step_weights[s-1] L_query(θ_s);\n"
        "exact meta-gradient through Hessian-vector products unless first_order. Means over tasks,\n"
        "except task_losses and pre_losses. Results do not depend on `threads`. all_step_losses=False\n"
        "skips L_query(θ_s) where step_weights[s-1] is zero (their step_losses are NaN). With adam_params\n"
        "(one buffer per parameter, grad_theta likewise) it then takes torch.optim.Adam's step in place.");
  py::class_<PlanBinding>(m, "MetaStepPlan",
                          "A fused meta-step of one network whose parameter, gradient and optional Adam buffers\n"
                          "(moments and torch's per-parameter step counters) are checked once and held; run() passes\n"
                          "only the batch. The held buffers are not checked again: the caller must build a new plan\n"
                          "when one of the tensors gets new storage or strides. Concurrent runs of one plan take turns.")
      .def(py::init<const std::string&, const std::vector<int>&, const std::vector<double>&, bool, int, double,
                    py::handle, py::handle, py::handle, py::handle, py::handle>(),
           py::kw_only(), py::arg("loss"), py::arg("layers"), py::arg("layer_constants"), py::arg("first_order"),
           py::arg("steps"), py::arg("inner_lr"), py::arg("params"), py::arg("grads"),
           py::arg("adam_exp_avg") = py::none(), py::arg("adam_exp_avg_sq") = py::none(),
           py::arg("adam_steps") = py::none())
      .def("run", &PlanBinding::run, py::arg("support_x"), py::arg("support_y"), py::arg("query_x"), py::arg("query_y"),
           py::arg("losses"), py::arg("threads") = 1, py::arg("adam_lr") = 0.0, py::arg("adam_beta1") = 0.9,
           py::arg("adam_beta2") = 0.999, py::arg("adam_eps") = 1e-8, py::arg("adam_weight_decay") = 0.0,
           "The meta-gradient into the gradient buffers (and the Adam step, if planned); losses [T + 2]\n"
           "receives the meta-loss, the mean pre-adaptation loss and the per-task losses.");
#if defined(PYMAML_WITH_CUDA)
  m.def("meta_step_cuda", &meta_step_cuda, py::kw_only(), py::arg("theta"), py::arg("lrs"),
        py::arg("step_weights"), py::arg("support_x"), py::arg("support_y"), py::arg("query_x"), py::arg("query_y"),
        py::arg("layers"), py::arg("layer_constants"), py::arg("loss"), py::arg("first_order"),
        py::arg("meta_loss"), py::arg("task_losses"), py::arg("pre_losses"), py::arg("step_losses"),
        py::arg("grad_theta"), py::arg("grad_lrs"), py::arg("workspace"), py::arg("counter"),
        py::arg("stream"), py::arg("blocks"), py::arg("labels_ok") = py::none(),
        py::arg("threads_per_block") = pymaml::kCudaThreadsPerBlock, py::arg("all_step_losses") = true,
        "meta_step on CUDA buffers of one device: one kernel launch on `stream` (a cudaStream_t as an\n"
        "integer) with theta's device current. counter: int32, zero, used by no other launch in flight.");
#endif
  m.def("meta_step_cuda_workspace", &meta_step_cuda_workspace, py::kw_only(), py::arg("layers"),
        py::arg("layer_constants"), py::arg("tasks"), py::arg("steps"), py::arg("support_points"),
        py::arg("query_points"), py::arg("lr_grad"), py::arg("blocks"),
        "Values of theta's dtype the CUDA meta-step needs as workspace.");
  m.def("meta_step_cuda_workspace_parts", &meta_step_cuda_workspace_parts, py::kw_only(), py::arg("layers"),
        py::arg("layer_constants"), py::arg("steps"), py::arg("support_points"), py::arg("query_points"),
        py::arg("lr_grad"),
        "(per block, per task): values of the CUDA workspace, blocks * per_block + tasks * per_task in all.");
  m.def("hvp", &hvp, py::kw_only(), py::arg("theta"), py::arg("v"), py::arg("x"), py::arg("y"), py::arg("layers"),
        py::arg("layer_constants"), py::arg("loss"), py::arg("hv"), py::arg("grad") = py::none(),
        py::arg("threads") = 1,
        "Batched Hessian-vector products of the encoded network's per-task loss: hv[t] = H(theta[t]) v[t]\n"
        "(R-operator), and the per-task gradients into grad when given. theta, v, hv, grad: [T, P].");
}
