// The CPU thread-group harness of the per-task math: meta_step_task, the HVP and the grid of a
// one-launch meta-step (csrc/core/meta_step_grid.h) run by groups of P cooperating std::threads,
// with sync() a barrier, exactly as a CUDA block runs them, and compiled with the loops the CUDA
// build compiles (BlockProducts, csrc/cuda/block_products.h). Every output, and the whole
// task workspace, must be bitwise identical to SerialGroup's: in the CUDA loops each output is
// computed whole by one rank in a fixed order, so any difference is a race, a missing barrier or
// rank loops that overlap.
//
// Three schedules of the ranks:
//   threads     the P threads run freely; sync() is a sense-reversing barrier of acquire-release
//               atomics (the ThreadSanitizer build checks these runs, .ci/sanitize.sh);
//   ascending,  the ranks take turns, one at a time, in rank order (or the reverse) between
//   descending  barriers: a read of another rank's value without a barrier between sees it
//               unwritten in one of the two orders, deterministically;
//   no-barrier  (self-test) the ranks run one after another and sync() does nothing, so results
//               must differ: proves the comparison sees a missing barrier;
//   unsynchronized  (self-test under ThreadSanitizer) free threads whose sync() does nothing,
//               which ThreadSanitizer must report as races.
//
//   group_harness [--quick] [--schedule no-barrier|unsynchronized]   exit status 0 when every check passes
//   (--quick: the ThreadSanitizer build's shorter list, .ci/sanitize.sh)
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

#include "core/meta_step_grid.h"
#include "cpu/meta_step_cpu.h"
#include "cuda/block_products.h"

namespace {

using pymaml::Activation;
using pymaml::Loss;
using pymaml::MetaStepShape;
using pymaml::Network;
// The products of a CUDA block, on CPU threads.
using Products = pymaml::BlockProducts;

// How the ranks of a group meet at sync().
class Coordinator {
 public:
  virtual ~Coordinator() = default;
  virtual void begin(int rank) = 0;
  virtual void sync(int rank) = 0;
  virtual void end(int rank) = 0;
};

// A sense-reversing barrier: the last of the P arrivals resets the count and publishes the next
// phase with a release store; the others wait for it with acquire loads (spinning briefly, then
// blocking in atomic wait). The arrivals' acquire-release increments make every rank's writes
// before the barrier happen before every rank's reads after it.
class Barrier final : public Coordinator {
 public:
  explicit Barrier(int parties) : parties_(parties) {}
  void begin(int) override {}
  void end(int) override {}
  void sync(int) override {
    const unsigned phase = phase_.load(std::memory_order_relaxed);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == parties_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_release);
      phase_.notify_all();
      return;
    }
    for (int spin = 0; spin < 64; ++spin) {
      if (phase_.load(std::memory_order_acquire) != phase) return;
    }
    while (phase_.load(std::memory_order_acquire) == phase) phase_.wait(phase, std::memory_order_acquire);
  }

 private:
  const int parties_;
  std::atomic<int> arrived_{0};
  std::atomic<unsigned> phase_{0};
};

// One rank runs at a time, in `order`; at sync() (when barriers are honoured) a rank hands the
// turn to the next one in the order, so each phase between barriers runs rank after rank.
class Turns final : public Coordinator {
 public:
  Turns(std::vector<int> order, bool barriers) : order_(std::move(order)), barriers_(barriers) {
    position_of_.resize(order_.size());
    for (size_t i = 0; i < order_.size(); ++i) {
      position_of_[order_[i]] = int(i);
      turn_.push_back(std::make_unique<std::binary_semaphore>(i == 0 ? 1 : 0));
    }
  }
  void begin(int rank) override { turn_[position_of_[rank]]->acquire(); }
  void sync(int rank) override {
    if (!barriers_) return;
    hand_on(rank);
    turn_[position_of_[rank]]->acquire();
  }
  void end(int rank) override { hand_on(rank); }

 private:
  void hand_on(int rank) {
    const size_t next = (size_t(position_of_[rank]) + 1) % order_.size();
    if (next != 0 || barriers_) turn_[next]->release();
  }

  std::vector<int> order_, position_of_;
  std::vector<std::unique_ptr<std::binary_semaphore>> turn_;
  bool barriers_;
};

// The thread-group policy of the per-task math over a Coordinator.
struct ThreadGroup {
  int rank_, size_;
  Coordinator* coordinator;
  int rank() const { return rank_; }
  int size() const { return size_; }
  void sync() const { coordinator->sync(rank_); }
};

enum class Schedule { threads, ascending, descending, no_barrier, unsynchronized };

// The ranks run freely and never wait for each other (the unsynchronized self-test).
class NoCoordination final : public Coordinator {
 public:
  void begin(int) override {}
  void sync(int) override {}
  void end(int) override {}
};

const char* schedule_name(Schedule schedule) {
  switch (schedule) {
    case Schedule::threads: return "threads";
    case Schedule::ascending: return "ascending";
    case Schedule::descending: return "descending";
    case Schedule::unsynchronized: return "unsynchronized";
    default: return "no-barrier";
  }
}

std::unique_ptr<Coordinator> make_coordinator(Schedule schedule, int P) {
  if (schedule == Schedule::threads) return std::make_unique<Barrier>(P);
  if (schedule == Schedule::unsynchronized) return std::make_unique<NoCoordination>();
  std::vector<int> order(P);
  for (int i = 0; i < P; ++i) order[i] = schedule == Schedule::descending ? P - 1 - i : i;
  return std::make_unique<Turns>(order, schedule != Schedule::no_barrier);
}

// Runs body(group) on P threads that form one group.
void run_group(int P, Schedule schedule, const std::function<void(const ThreadGroup&)>& body) {
  const std::unique_ptr<Coordinator> coordinator = make_coordinator(schedule, P);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < P; ++rank) {
    threads.emplace_back([&, rank] {
      const ThreadGroup group{rank, P, coordinator.get()};
      coordinator->begin(rank);
      body(group);
      coordinator->end(rank);
    });
  }
  for (std::thread& thread : threads) thread.join();
}

// Runs body on the calling thread as the CPU launcher's SerialGroup (P = 0), or on a group of P
// threads (run_group); body takes either group.
template <class Body>
void run_serial_or_group(int P, Schedule schedule, const Body& body) {
  if (P == 0) {
    body(pymaml::SerialGroup{});
  } else {
    run_group(P, schedule, body);
  }
}

// The grid policy of meta_step_grid on the CPU: the counter as a std::atomic_ref with the same
// acquire-release increment as the CUDA kernel's cuda::atomic_ref.
struct HostGrid {
  int block_, blocks_;
  bool* last;
  int block() const { return block_; }
  int blocks() const { return blocks_; }
  bool& last_flag() const { return *last; }
  unsigned int arrive(unsigned int* counter) const {
    return std::atomic_ref<unsigned int>(*counter).fetch_add(1u, std::memory_order_acq_rel);
  }
  void reset(unsigned int* counter) const { std::atomic_ref<unsigned int>(*counter).store(0u, std::memory_order_relaxed); }
  template <class T>
  T load(const T* p) const {
    return *p;
  }
};

struct Config {
  std::string name;
  std::vector<int> widths;
  Activation activation;
  bool bias;
  Loss loss;
  int steps, support_points, query_points;
  bool first_order, lr_grad, all_step_losses;
  std::vector<double> step_weights;  // empty: all ones
  // A network given layer by layer (widths[0] its inputs; the other widths, activation and bias
  // unused); empty: the MLP of widths, activation and bias.
  std::vector<pymaml::Layer> layers = {};
  // The input image's height and width, with widths[0] channels (layers only).
  int height = 1, width = 1;
};

pymaml::Layer linear_layer(int out, bool bias) {
  pymaml::Layer layer;
  layer.kind = pymaml::LayerKind::linear;
  layer.channels_out = out;
  layer.bias = bias;
  return layer;
}

pymaml::Layer batch_norm_layer(bool affine, double eps, int rows = 1) {
  pymaml::Layer layer;
  layer.kind = pymaml::LayerKind::batch_norm;
  layer.affine = affine;
  layer.constant = eps;
  layer.rows = rows;
  return layer;
}

pymaml::Layer activation_layer(Activation activation) {
  pymaml::Layer layer;
  layer.kind = pymaml::LayerKind::activation;
  layer.activation = activation;
  return layer;
}

// An activation with a constant: LeakyReLU's negative slope, ELU's alpha.
pymaml::Layer activation_layer(Activation activation, double constant) {
  pymaml::Layer layer = activation_layer(activation);
  layer.constant = constant;
  return layer;
}

// MaxPool2d or AvgPool2d with kernel = stride = `kernel`, no padding.
pymaml::Layer pool_layer(pymaml::LayerKind kind, int kernel) {
  pymaml::Layer layer;
  layer.kind = kind;
  layer.kernel = kernel;
  layer.stride = kernel;
  return layer;
}

pymaml::Layer flatten_layer() {
  pymaml::Layer layer;
  layer.kind = pymaml::LayerKind::flatten;
  return layer;
}

pymaml::Layer conv2d_layer(int out_channels, int kernel, int stride, int padding, bool bias) {
  pymaml::Layer layer;
  layer.kind = pymaml::LayerKind::conv2d;
  layer.channels_out = out_channels;
  layer.kernel = kernel;
  layer.stride = stride;
  layer.padding = padding;
  layer.bias = bias;
  return layer;
}

std::vector<Config> configurations() {
  const Activation none = Activation::none, relu = Activation::relu, tanh = Activation::tanh,
                   sigmoid = Activation::sigmoid, leaky_relu = Activation::leaky_relu, elu = Activation::elu;
  const pymaml::LayerKind max_pool = pymaml::LayerKind::max_pool, avg_pool = pymaml::LayerKind::avg_pool;
  const Loss mse = Loss::mse, ce = Loss::cross_entropy;
  return {
      {"sinusoid", {1, 40, 40, 1}, relu, true, mse, 1, 10, 10, false, false, true, {}},
      {"linear_1x1_S0", {1, 1}, none, true, mse, 0, 3, 3, false, false, true, {}},
      {"tanh_nobias_ce_lr", {3, 2}, tanh, false, ce, 2, 5, 4, false, true, true, {}},
      {"sigmoid_ce_weights_first_order", {5, 7, 3}, sigmoid, true, ce, 3, 4, 6, true, true, false, {0.5, 0, 2}},
      {"dot_output_128", {2, 128, 1}, tanh, true, mse, 2, 20, 20, false, false, true, {}},
      {"wide_input_dot4", {128, 17, 4}, relu, true, ce, 1, 6, 9, false, true, true, {}},
      {"sigmoid_nobias_128_weights", {3, 64, 128, 5}, sigmoid, false, mse, 3, 8, 8, false, true, true, {1, 0.25, 1}},
      {"point_blocks_300", {4, 16, 16, 16, 2}, tanh, true, mse, 1, 300, 140, false, false, true, {}},
      {"point_blocks_ce_first_order", {6, 33, 6}, relu, false, ce, 2, 130, 129, true, false, true, {}},
      {"single_layer_128", {128, 128}, none, true, mse, 1, 4, 4, false, true, true, {}},
      {"deep_tanh_zero_weights", {7, 9, 11, 13, 3}, tanh, true, ce, 3, 3, 5, false, true, false, {0, 0, 1}},
      {"sigmoid_three_hidden", {2, 50, 50, 50, 2}, sigmoid, true, ce, 2, 12, 12, false, false, true, {}},
      {"one_point_S0", {1, 5, 1}, relu, true, mse, 0, 1, 1, false, false, true, {}},
      {"widest_relu_ce", {10, 128, 128, 10}, relu, true, ce, 3, 16, 16, false, true, true, {0.5, 1, 1}},
      // Every layer kind, a different activation in each place, biases on some layers only.
      {"flatten_mixed_layers", {5}, none, true, ce, 2, 6, 7, false, true, true, {0.5, 1},
       {flatten_layer(), linear_layer(9, true), activation_layer(tanh), linear_layer(20, false),
        activation_layer(relu), flatten_layer(), linear_layer(7, true), activation_layer(sigmoid),
        linear_layer(3, true), activation_layer(none), flatten_layer()}},
      {"linear_linear_mse", {3}, none, true, mse, 3, 5, 5, false, false, true, {},
       {linear_layer(18, false), linear_layer(2, true), activation_layer(tanh), linear_layer(2, true)}},
      // Conv2d. The input is a vector [n, 1, 1]: a first convolution whose padding exceeds its
      // kernel makes an image of it (every output pixel sees the one input pixel through another
      // tap), on which the next convolutions work with input gradients; F = 16 and 32 read and
      // write the channels-last rows in place, the other F through padded pixel rows.
      {"conv_stride2_flatten_linear", {3}, none, true, ce, 2, 6, 7, false, true, true, {},
       {conv2d_layer(16, 5, 1, 5, true), activation_layer(tanh), conv2d_layer(5, 3, 2, 1, true),
        activation_layer(relu), flatten_layer(), linear_layer(3, true)}},
      {"conv_nobias_kernels_1_2", {2}, none, true, mse, 3, 5, 5, false, false, true, {},
       {conv2d_layer(3, 3, 1, 2, false), activation_layer(sigmoid), conv2d_layer(16, 1, 1, 0, false),
        activation_layer(relu), conv2d_layer(4, 2, 2, 1, true), flatten_layer(), linear_layer(2, true)}},
      {"conv_kernel5_stride_over_kernel_first_order", {4}, none, true, ce, 2, 4, 5, true, true, true, {1, 0.5},
       {conv2d_layer(6, 4, 1, 4, true), activation_layer(relu), conv2d_layer(5, 1, 2, 0, true),
        activation_layer(tanh), conv2d_layer(7, 5, 1, 2, true), flatten_layer(), linear_layer(3, true)}},
      // The points run in chunks of two in the second convolution's products, the last one short.
      {"conv_point_chunks", {2}, none, true, mse, 1, 7, 5, false, false, true, {},
       {conv2d_layer(16, 3, 1, 5, true), activation_layer(relu), conv2d_layer(32, 3, 1, 1, true),
        activation_layer(tanh), flatten_layer(), linear_layer(2, true)}},
      {"leaky_relu_elu", {6}, none, true, ce, 2, 9, 7, false, true, true, {0.5, 1},
       {linear_layer(20, true), activation_layer(leaky_relu, 0.1), linear_layer(17, false),
        activation_layer(elu, 0.7), linear_layer(3, true)}},
      {"elu_leaky_relu_mse", {4}, none, true, mse, 3, 6, 6, false, false, true, {},
       {linear_layer(33, true), activation_layer(elu, 1.0), linear_layer(9, true),
        activation_layer(leaky_relu, 0.01), linear_layer(2, true)}},
      // Pooling on a [3, 7, 5] image: the last row of pixels belongs to no 2x2 window; a pooling
      // after a pooling.
      {"max_pool_image", {3}, none, true, ce, 2, 6, 5, false, true, true, {},
       {pool_layer(max_pool, 2), flatten_layer(), linear_layer(10, true), activation_layer(elu, 1.0),
        linear_layer(4, true)}, 7, 5},
      {"avg_max_pool_image", {2}, none, true, mse, 1, 5, 4, false, false, true, {},
       {pool_layer(avg_pool, 2), pool_layer(max_pool, 2), flatten_layer(), linear_layer(6, true),
        activation_layer(leaky_relu, 0.2), linear_layer(2, true)}, 6, 9},
      // Pooling after convolutions on an image input, so that its backward and R-backward run inside
      // a network (a Conv2d before it has parameters).
      {"conv_pool_image", {3}, none, true, ce, 2, 6, 5, false, true, true, {},
       {conv2d_layer(8, 3, 1, 1, true), activation_layer(relu), pool_layer(max_pool, 2),
        conv2d_layer(5, 3, 1, 1, false), activation_layer(elu, 1.0), pool_layer(avg_pool, 2), flatten_layer(),
        linear_layer(3, true)}, 9, 7},
      // BatchNorm on the batch statistics: affine between Linear layers; first on the data (affine,
      // and without parameters, whose output gradient nothing needs); without affine between
      // layers; over more than one block of values (kPointBlock).
      {"batch_norm_affine", {6}, none, true, ce, 2, 7, 9, false, true, true, {0.5, 1},
       {linear_layer(12, true), batch_norm_layer(true, 1e-5), activation_layer(relu), linear_layer(3, true)}},
      {"batch_norm_on_data", {5}, none, true, mse, 2, 6, 5, false, true, true, {},
       {batch_norm_layer(true, 1e-3), linear_layer(8, true), activation_layer(tanh), batch_norm_layer(false, 1e-5),
        linear_layer(2, true)}},
      {"batch_norm_data_no_affine", {3}, none, true, ce, 1, 5, 4, false, false, true, {},
       {batch_norm_layer(false, 1e-5), linear_layer(9, false), activation_layer(sigmoid), batch_norm_layer(true, 0.1),
        linear_layer(4, true)}},
      {"batch_norm_point_blocks", {4}, none, true, mse, 1, 300, 140, false, false, true, {},
       {linear_layer(17, false), batch_norm_layer(false, 1e-5), activation_layer(tanh), linear_layer(2, true)}},
      // BatchNorm2d on the channels of images, between a convolution and a pooling.
      {"conv_batch_norm_image", {3}, none, true, ce, 2, 6, 5, false, true, true, {},
       {conv2d_layer(8, 3, 1, 1, true), batch_norm_layer(true, 1e-5), activation_layer(relu), pool_layer(max_pool, 2),
        conv2d_layer(5, 3, 1, 1, false), batch_norm_layer(false, 1e-5), activation_layer(tanh), flatten_layer(),
        linear_layer(3, true)}, 6, 5},
      // PerStepBatchNorm2d: rows 0..2 of γ and β at inner steps 0..2, row 2 again at step 3; the
      // other rows' gradients and HVPs are zero, written by whichever rank owns their lanes.
      {"per_step_batch_norm_image", {2}, none, true, ce, 3, 5, 6, false, true, true, {0.25, 0, 1},
       {conv2d_layer(6, 3, 1, 1, true), batch_norm_layer(true, 1e-5, 3), activation_layer(relu),
        pool_layer(avg_pool, 2), flatten_layer(), linear_layer(3, true)}, 5, 5},
  };
}

Network make(const Config& c) {
  Network spec;
  const bool built = c.layers.empty()
      ? pymaml::make_mlp_network(c.widths.data(), int(c.widths.size()), c.bias, c.activation, c.loss, &spec)
      : pymaml::make_network(c.layers.data(), int(c.layers.size()), c.widths[0], c.height, c.width, c.loss, &spec);
  if (!built) {
    std::fprintf(stderr, "bad widths in %s\n", c.name.c_str());
    std::exit(2);
  }
  return spec;
}

// The inputs of T tasks of one configuration, from a fixed seed.
template <class T>
struct Data {
  std::vector<T> theta, lrs, step_weights, support_x, support_values, query_x, query_values;
  std::vector<int64_t> support_labels, query_labels;

  Data(const Config& c, const Network& s, int tasks, uint64_t seed) {
    std::mt19937_64 random(seed);
    std::uniform_real_distribution<double> uniform(-1.0, 1.0);
    auto fill = [&](std::vector<T>& v, int64_t n, double scale) {
      v.resize(size_t(n));
      for (T& x : v) x = T(scale * uniform(random));
    };
    const int64_t P = s.num_params, S = c.steps, n0 = s.inputs(), nL = s.outputs();
    fill(theta, P, 0.7);
    lrs.resize(size_t(S * P));
    for (T& x : lrs) x = T(0.05 + 0.1 * (uniform(random) + 1));
    step_weights.assign(size_t(S), T(1));
    for (size_t i = 0; i < c.step_weights.size(); ++i) step_weights[i] = T(c.step_weights[i]);
    fill(support_x, tasks * c.support_points * n0, 2.0);
    fill(query_x, tasks * c.query_points * n0, 2.0);
    if (c.loss == Loss::mse) {
      fill(support_values, tasks * c.support_points * nL, 1.0);
      fill(query_values, tasks * c.query_points * nL, 1.0);
    } else {
      for (int64_t i = 0; i < tasks * c.support_points; ++i) support_labels.push_back(int64_t(random() % nL));
      for (int64_t i = 0; i < tasks * c.query_points; ++i) query_labels.push_back(int64_t(random() % nL));
    }
  }

  pymaml::MetaBatch<T> batch(int tasks) const {
    auto ptr = [](const auto& v) { return v.empty() ? nullptr : v.data(); };
    return {tasks, ptr(theta), ptr(lrs), ptr(step_weights), ptr(support_x), ptr(support_values), ptr(support_labels),
            ptr(query_x), ptr(query_values), ptr(query_labels)};
  }
};

MetaStepShape shape_of(const Config& c) {
  return MetaStepShape{c.steps, c.support_points, c.query_points, c.first_order, c.lr_grad, c.all_step_losses};
}

struct Report {
  int checks = 0, failures = 0;
  void compare(const std::string& name, const void* expected, const void* actual, size_t bytes) {
    ++checks;
    if (std::memcmp(expected, actual, bytes) == 0) {
      std::printf("ok   %s\n", name.c_str());
      return;
    }
    ++failures;
    std::printf("FAIL %s: not bitwise identical to SerialGroup\n", name.c_str());
  }
  void expect(const std::string& name, bool condition, const char* what) {
    ++checks;
    if (condition) {
      std::printf("ok   %s\n", name.c_str());
    } else {
      ++failures;
      std::printf("FAIL %s: %s\n", name.c_str(), what);
    }
  }
};

// Everything one task's meta-step writes: its outputs and its whole workspace.
template <class T>
struct TaskRun {
  std::vector<T> workspace, grad_theta, grad_lrs, step_losses, losses;  // losses: task, pre

  bool operator==(const TaskRun& other) const {
    auto same = [](const std::vector<T>& a, const std::vector<T>& b) {
      return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
    };
    return same(workspace, other.workspace) && same(grad_theta, other.grad_theta) && same(grad_lrs, other.grad_lrs) &&
           same(step_losses, other.step_losses) && same(losses, other.losses);
  }
};

// meta_step_task of task 0 on group(s) of P ranks (P = 0: SerialGroup), θ_0 and α padded by the group.
template <class T>
TaskRun<T> run_task(const Config& c, const Network& s, const Data<T>& d, int P, Schedule schedule) {
  const MetaStepShape m = shape_of(c);
  const int S = c.steps;
  const int64_t PP = s.num_padded_params;
  TaskRun<T> run;
  run.workspace.assign(size_t(pymaml::TaskWorkspace<T>::size(s, c.support_points, c.query_points, S)), T(0));
  run.grad_theta.assign(size_t(PP), T(0));
  run.grad_lrs.assign(size_t(S * PP), T(0));
  run.step_losses.assign(size_t(S), T(0));
  run.losses.assign(2, T(0));
  std::vector<T> theta(size_t(PP), T(0)), lrs(size_t(S * PP), T(0));
  const bool labels = c.loss == Loss::cross_entropy;
  const pymaml::Targets<T> sy{labels ? nullptr : d.support_values.data(), labels ? d.support_labels.data() : nullptr};
  const pymaml::Targets<T> qy{labels ? nullptr : d.query_values.data(), labels ? d.query_labels.data() : nullptr};
  auto body = [&](const auto& g) {
    pymaml::to_padded(g, s, d.theta.data(), theta.data());
    for (int step = 0; step < S; ++step) {
      pymaml::to_padded(g, s, d.lrs.data() + int64_t(step) * s.num_params, lrs.data() + int64_t(step) * PP);
    }
    pymaml::meta_step_task<Products>(g, s, m, theta.data(), static_cast<const T*>(nullptr), lrs.data(), d.step_weights.data(),
                           d.support_x.data(), sy, d.query_x.data(), qy, run.workspace.data(), &run.losses[0],
                           &run.losses[1], run.step_losses.data(), run.grad_theta.data(),
                           c.lr_grad ? run.grad_lrs.data() : nullptr);
  };
  run_serial_or_group(P, schedule, body);
  return run;
}

// hvp on the support points of task 0 at θ_0, with u a random padded vector.
template <class T>
TaskRun<T> run_hvp(const Config& c, const Network& s, const Data<T>& d, int P, Schedule schedule) {
  const int K = c.support_points, PP = int(s.num_padded_params);
  TaskRun<T> run;
  run.workspace.assign(size_t(pymaml::TaskWorkspace<T>::size(s, K, K, 0)), T(0));
  run.grad_theta.assign(size_t(PP), T(0));  // the gradient
  run.grad_lrs.assign(size_t(PP), T(0));    // the HVP
  std::vector<T> theta(size_t(PP), T(0)), u(size_t(PP), T(0)), WT(size_t(s.wt_size), T(0));
  std::vector<T> u_flat(d.theta.size());
  for (size_t i = 0; i < u_flat.size(); ++i) u_flat[i] = T(0.5) * d.theta[(i * 7 + 3) % d.theta.size()] + T(0.125);
  const bool labels = c.loss == Loss::cross_entropy;
  const pymaml::Targets<T> y{labels ? nullptr : d.support_values.data(), labels ? d.support_labels.data() : nullptr};
  auto body = [&](const auto& g) {
    pymaml::to_padded(g, s, d.theta.data(), theta.data());
    pymaml::to_padded(g, s, u_flat.data(), u.data());
    pymaml::transpose_weights<Products>(g, s, theta.data(), WT.data());
    const pymaml::TaskWorkspace<T> ws(run.workspace.data(), s, K, K, 0);
    pymaml::network_hvp<Products>(g, s, theta.data(), WT.data(), u.data(), d.support_x.data(), y, K, ws, run.grad_theta.data(),
                    run.grad_lrs.data());
  };
  run_serial_or_group(P, schedule, body);
  return run;
}

// The results of a whole launch.
template <class T>
struct GridRun {
  std::vector<T> meta_loss, task_losses, pre_losses, step_losses, grad_theta, grad_lrs;
  unsigned int counter_after = 1;
  int labels_ok = -1;

  std::vector<const std::vector<T>*> outputs() const {
    return {&meta_loss, &task_losses, &pre_losses, &step_losses, &grad_theta, &grad_lrs};
  }
  bool same_outputs(const GridRun& other) const {
    const auto a = outputs(), b = other.outputs();
    for (size_t i = 0; i < a.size(); ++i) {
      if (a[i]->size() != b[i]->size() || std::memcmp(a[i]->data(), b[i]->data(), a[i]->size() * sizeof(T)) != 0) {
        return false;
      }
    }
    return true;
  }
  pymaml::MetaResult<T> result() {
    return {meta_loss.data(), task_losses.data(), pre_losses.data(), step_losses.data(), grad_theta.data(),
            grad_lrs.empty() ? nullptr : grad_lrs.data()};
  }
  GridRun(const Config& c, const Network& s, int tasks)
      : meta_loss(1), task_losses(size_t(tasks)), pre_losses(size_t(tasks)), step_losses(size_t(c.steps)),
        grad_theta(size_t(s.num_params)), grad_lrs(c.lr_grad ? size_t(c.steps * s.num_params) : 0) {}
};

// The launch modelled on the CPU: `blocks` groups of P threads at once, on a workspace of
// garbage (NaN) and a counter that two launches in a row share.
template <class T>
GridRun<T> run_grid(const Config& c, const Network& s, const Data<T>& d, int tasks, int blocks, int P) {
  const MetaStepShape m = shape_of(c);
  GridRun<T> run(c, s, tasks);
  std::vector<T> workspace(size_t(pymaml::grid_workspace_elements(s, m, tasks, blocks)), T(NAN));
  unsigned int counter = 0;
  int labels_ok = -1;
  const pymaml::MetaBatch<T> batch = d.batch(tasks);
  for (int launch = 0; launch < 2; ++launch) {
    std::vector<std::thread> groups;
    std::unique_ptr<bool[]> last(new bool[size_t(blocks)]);
    for (int block = 0; block < blocks; ++block) {
      groups.emplace_back([&, block] {
        const HostGrid grid{block, blocks, &last[size_t(block)]};
        run_group(P, Schedule::threads, [&](const ThreadGroup& g) {
          pymaml::meta_step_grid<Products>(g, grid, s, m, batch, run.result(), workspace.data(), &counter,
                                 c.loss == Loss::cross_entropy ? &labels_ok : nullptr);
        });
      });
    }
    for (std::thread& group : groups) group.join();
  }
  run.counter_after = counter;
  run.labels_ok = labels_ok;
  return run;
}

// The launch's results computed independently: each task alone on a SerialGroup, then the means
// over tasks summed in task order.
template <class T>
GridRun<T> serial_launch(const Config& c, const Network& s, const Data<T>& d, int tasks) {
  const MetaStepShape m = shape_of(c);
  const int S = c.steps;
  const int64_t PP = s.num_padded_params, P = s.num_params, n0 = s.inputs(), nL = s.outputs();
  const int64_t width = PP + (c.lr_grad ? S * PP : 0) + (S > 0 ? S : 1);
  GridRun<T> run(c, s, tasks);
  std::vector<T> rows(size_t(tasks * width), T(0)), theta(size_t(PP), T(0)), lrs(size_t(S * PP), T(0));
  const pymaml::SerialGroup g;
  pymaml::to_padded(g, s, d.theta.data(), theta.data());
  for (int step = 0; step < S; ++step) pymaml::to_padded(g, s, d.lrs.data() + step * P, lrs.data() + step * PP);
  const bool labels = c.loss == Loss::cross_entropy;
  for (int t = 0; t < tasks; ++t) {
    std::vector<T> workspace(size_t(pymaml::TaskWorkspace<T>::size(s, c.support_points, c.query_points, S)), T(0));
    T* out = rows.data() + t * width;
    const pymaml::Targets<T> sy{labels ? nullptr : d.support_values.data() + t * c.support_points * nL,
                                labels ? d.support_labels.data() + t * c.support_points : nullptr};
    const pymaml::Targets<T> qy{labels ? nullptr : d.query_values.data() + t * c.query_points * nL,
                                labels ? d.query_labels.data() + t * c.query_points : nullptr};
    pymaml::meta_step_task<Products>(g, s, m, theta.data(), static_cast<const T*>(nullptr), lrs.data(), d.step_weights.data(),
                           d.support_x.data() + t * c.support_points * n0, sy,
                           d.query_x.data() + t * c.query_points * n0, qy, workspace.data(), &run.task_losses[t],
                           &run.pre_losses[t], out + PP + (c.lr_grad ? S * PP : 0), out,
                           c.lr_grad ? out + PP : nullptr);
  }
  std::vector<T> mean(static_cast<size_t>(width));
  for (int64_t j = 0; j < width; ++j) {
    T sum = 0;
    for (int t = 0; t < tasks; ++t) sum += rows[size_t(t * width + j)];
    mean[size_t(j)] = sum / T(tasks);
  }
  pymaml::from_padded(g, s, mean.data(), run.grad_theta.data());
  for (int step = 0; c.lr_grad && step < S; ++step) {
    pymaml::from_padded(g, s, mean.data() + PP + step * PP, run.grad_lrs.data() + step * P);
  }
  for (int step = 0; step < S; ++step) run.step_losses[step] = mean[size_t(PP + (c.lr_grad ? S * PP : 0) + step)];
  T total = 0;
  for (int t = 0; t < tasks; ++t) total += run.task_losses[t];
  run.meta_loss[0] = total / T(tasks);
  run.counter_after = 0;
  run.labels_ok = labels ? 1 : -1;
  return run;
}

template <class T>
void check_configuration(const Config& c, const std::vector<int>& group_sizes, Schedule schedule, bool grid,
                         Report& report) {
  const Network s = make(c);
  const Data<T> d(c, s, 5, 12345 + c.widths.size() * 31 + uint64_t(c.steps));
  const std::string type = sizeof(T) == 4 ? "f32" : "f64";
  const TaskRun<T> serial = run_task(c, s, d, 0, schedule), serial_hvp = run_hvp(c, s, d, 0, schedule);
  for (int P : group_sizes) {
    const std::string where = c.name + " " + type + " P=" + std::to_string(P) + " " + schedule_name(schedule);
    const TaskRun<T> task = run_task(c, s, d, P, schedule);
    report.expect("meta_step_task " + where, task == serial, "not bitwise identical to SerialGroup");
    const TaskRun<T> hvp = run_hvp(c, s, d, P, schedule);
    report.expect("hvp " + where, hvp == serial_hvp, "not bitwise identical to SerialGroup");
  }
  if (!grid) return;
  const int tasks = 5;
  const GridRun<T> expected = serial_launch(c, s, d, tasks);
  for (const auto& [blocks, P] : std::vector<std::pair<int, int>>{{1, 1}, {2, 3}, {3, 7}, {8, 2}}) {
    const std::string where = c.name + " " + type + " blocks=" + std::to_string(blocks) + " P=" + std::to_string(P);
    const GridRun<T> run = run_grid(c, s, d, tasks, blocks, P);
    report.expect("grid " + where, run.same_outputs(expected), "not bitwise identical to the serial tasks' means");
    report.expect("grid counter " + where, run.counter_after == 0, "the last group left the counter nonzero");
    report.expect("grid labels_ok " + where, run.labels_ok == expected.labels_ok, "wrong label verdict");
  }
}

// A label outside [0, n_L) in one task: that task's results are NaN, the others are exact, the
// launch reports labels_ok = 0, and no label indexes the logits.
template <class T>
void check_label_range(Report& report) {
  const Config c{"labels", {3, 8, 4}, Activation::tanh, true, Loss::cross_entropy, 2, 5, 5, false, true, true, {}};
  const Network s = make(c);
  const int tasks = 4;
  const std::string type = sizeof(T) == 4 ? "f32" : "f64";
  for (const int64_t bad : {int64_t(-1), int64_t(4), int64_t(1) << 40}) {
    Data<T> d(c, s, tasks, 777);
    const GridRun<T> good = run_grid(c, s, d, tasks, 2, 3);
    d.query_labels[size_t(2 * c.query_points + 1)] = bad;
    const GridRun<T> run = run_grid(c, s, d, tasks, 2, 3);
    const std::string where = type + " label " + std::to_string(bad);
    report.expect("labels_ok good " + where, good.labels_ok == 1, "labels_ok is not 1 for labels in range");
    report.expect("labels_ok bad " + where, run.labels_ok == 0, "labels_ok is not 0 for a label outside");
    const bool others_exact = run.task_losses[0] == good.task_losses[0] && run.task_losses[1] == good.task_losses[1] &&
                              run.task_losses[3] == good.task_losses[3] && run.pre_losses[3] == good.pre_losses[3];
    report.expect("labels other tasks " + where, others_exact, "a task with labels in range changed");
    report.expect("labels NaN " + where,
                  std::isnan(run.task_losses[2]) && std::isnan(run.pre_losses[2]) && std::isnan(run.meta_loss[0]) &&
                      std::isnan(run.grad_theta[0]) && std::isnan(run.step_losses[0]),
                  "the bad task's results are not NaN");
  }
}

// Flatten changes no value: an MLP with Flatten layers at the start, between layers and at the
// end computes what the MLP computes, bitwise, down to its whole workspace.
template <class T>
void check_flatten_is_identity(Report& report) {
  const Config mlp{"mlp", {4, 16, 16, 2}, Activation::tanh, true, Loss::cross_entropy, 2, 5, 6, false, true, true, {}};
  Config flattened = mlp;
  flattened.layers = {flatten_layer(),          linear_layer(16, true), activation_layer(Activation::tanh),
                      flatten_layer(),          linear_layer(16, true), flatten_layer(),
                      activation_layer(Activation::tanh), linear_layer(2, true), flatten_layer()};
  const Network a = make(mlp), b = make(flattened);
  const Data<T> d(mlp, a, 5, 4242);
  const std::string type = sizeof(T) == 4 ? "f32" : "f64";
  report.expect("flatten layout " + type, a.num_params == b.num_params && a.units == b.units, "Flatten changed the layout");
  const TaskRun<T> plain = run_task(mlp, a, d, 0, Schedule::threads), with = run_task(flattened, b, d, 0, Schedule::threads);
  report.expect("flatten meta_step_task " + type, plain == with, "Flatten changed a result");
  const TaskRun<T> plain_hvp = run_hvp(mlp, a, d, 0, Schedule::threads), with_hvp = run_hvp(flattened, b, d, 0, Schedule::threads);
  report.expect("flatten hvp " + type, plain_hvp == with_hvp, "Flatten changed an HVP");
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  Schedule only = Schedule::threads;
  bool self_test = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") {
      quick = true;
    } else if (arg == "--schedule" && i + 1 < argc &&
               (std::string(argv[i + 1]) == "no-barrier" || std::string(argv[i + 1]) == "unsynchronized")) {
      self_test = true;
      only = std::string(argv[i + 1]) == "no-barrier" ? Schedule::no_barrier : Schedule::unsynchronized;
      ++i;
    } else {
      std::fprintf(stderr, "usage: group_harness [--quick] [--schedule no-barrier|unsynchronized]\n");
      return 2;
    }
  }
  const std::vector<int> group_sizes{1, 2, 3, 7, 32, 128};
  const std::vector<Config> configs = configurations();
  Report report;
  if (self_test) {
    const size_t count = only == Schedule::unsynchronized ? 1 : configs.size();
    for (size_t i = 0; i < count; ++i) check_configuration<double>(configs[i], {3}, only, false, report);
  } else {
    for (size_t i = 0; i < configs.size(); ++i) {
      const Config& c = configs[i];
      // --quick (ThreadSanitizer): every configuration on free threads in float64, groups of 3
      // and 32, and of 128 for the first three, with the grid; float32 for the first seven.
      std::vector<int> sizes = group_sizes;
      if (quick) sizes = i < 3 ? std::vector<int>{3, 32, 128} : std::vector<int>{3, 32};
      check_configuration<double>(c, sizes, Schedule::threads, true, report);
      if (!quick || i < 7) check_configuration<float>(c, sizes, Schedule::threads, !quick, report);
      if (!quick) {
        check_configuration<double>(c, {3, 32}, Schedule::ascending, false, report);
        check_configuration<float>(c, {2, 7}, Schedule::descending, false, report);
      }
    }
    check_label_range<double>(report);
    check_label_range<float>(report);
    check_flatten_is_identity<double>(report);
    check_flatten_is_identity<float>(report);
  }
  std::printf("group_harness: %d of %d checks passed\n", report.checks - report.failures, report.checks);
  return report.failures == 0 ? 0 : 1;
}
