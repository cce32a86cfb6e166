// A torch-free check of the CPU launcher's per-task math against cases exported from the oracle
// (tests/native_cases.py writes them): for every case it runs pymaml::meta_step_cpu or
// pymaml::hvp_cpu in float64 and compares each output with the oracle's, as
// ||actual − expected|| / ||expected|| ≤ tolerance. It needs nothing but a C++17 compiler, so
// it builds for other architectures (aarch64) and runs under an emulator there.
//
//   oracle_check CASES_FILE [TOLERANCE]      exit status 0 when every case passes
//
// The file is whitespace-separated tokens: "pymaml-oracle-cases 1 <count>", then per case its
// kind ("meta_step" or "hvp"), a name, the MLP and the arrays, each array as
// "<name> <count> <values...>" with the values as C99 hexadecimal floats (exact in both directions).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/meta_step_cpu.h"

namespace {

class Reader {
 public:
  explicit Reader(const char* path) : in_(path) {
    if (!in_) throw std::runtime_error(std::string("cannot open ") + path);
  }

  std::string word() {
    std::string token;
    if (!(in_ >> token)) throw std::runtime_error("the cases file ends early");
    return token;
  }

  void expect(const std::string& wanted) {
    const std::string token = word();
    if (token != wanted) throw std::runtime_error("expected '" + wanted + "', read '" + token + "'");
  }

  int64_t integer(const std::string& name) {
    expect(name);
    return std::stoll(word());
  }

  std::vector<double> array(const std::string& name) {
    const int64_t count = integer(name);
    std::vector<double> values(static_cast<size_t>(count));
    for (double& value : values) value = std::strtod(word().c_str(), nullptr);
    return values;
  }

 private:
  std::ifstream in_;
};

pymaml::Activation parse_activation(const std::string& name) {
  if (name == "none") return pymaml::Activation::none;
  if (name == "relu") return pymaml::Activation::relu;
  if (name == "tanh") return pymaml::Activation::tanh;
  if (name == "sigmoid") return pymaml::Activation::sigmoid;
  throw std::runtime_error("unknown activation " + name);
}

pymaml::Loss parse_loss(const std::string& name) {
  if (name == "mse") return pymaml::Loss::mse;
  if (name == "cross_entropy") return pymaml::Loss::cross_entropy;
  throw std::runtime_error("unknown loss " + name);
}

double relative_error(const std::vector<double>& actual, const std::vector<double>& expected) {
  if (actual.size() != expected.size()) return INFINITY;
  double difference = 0, scale = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    difference += (actual[i] - expected[i]) * (actual[i] - expected[i]);
    scale += expected[i] * expected[i];
  }
  return scale > 0 ? std::sqrt(difference / scale) : std::sqrt(difference);
}

struct Case {
  std::string name;
  pymaml::Network spec;
  bool labels = false;
};

Case read_spec(Reader& reader) {
  Case c;
  c.name = reader.word();
  const int64_t layers = reader.integer("widths");
  std::vector<int> widths(static_cast<size_t>(layers));
  for (int& width : widths) width = std::stoi(reader.word());
  const bool bias = reader.integer("bias") != 0;
  reader.expect("activation");
  const pymaml::Activation activation = parse_activation(reader.word());
  reader.expect("loss");
  const pymaml::Loss loss = parse_loss(reader.word());
  if (!pymaml::make_mlp_network(widths.data(), int(widths.size()), bias, activation, loss, &c.spec)) {
    throw std::runtime_error(c.name + ": invalid widths");
  }
  c.labels = loss == pymaml::Loss::cross_entropy;
  return c;
}

std::vector<int64_t> as_labels(const std::vector<double>& values) { return {values.begin(), values.end()}; }

struct Output {
  const char* name;
  const std::vector<double>& actual;
  const std::vector<double>& expected;
};

// Each output's relative error, printed; true when all are within the tolerance.
bool compare(const std::string& name, const std::vector<Output>& outputs, double tolerance) {
  bool ok = true;
  for (const Output& output : outputs) {
    const double error = relative_error(output.actual, output.expected);
    const bool passed = error <= tolerance;
    ok &= passed;
    std::printf("%s %s %s relative error %.3g\n", passed ? "ok  " : "FAIL", name.c_str(), output.name, error);
  }
  return ok;
}

bool run_meta_step(Reader& reader, double tolerance) {
  const Case c = read_spec(reader);
  const int steps = int(reader.integer("steps"));
  const bool first_order = reader.integer("first_order") != 0, lr_grad = reader.integer("lr_grad") != 0;
  const int tasks = int(reader.integer("tasks")), support = int(reader.integer("support")),
            query = int(reader.integer("query"));
  const std::vector<double> theta = reader.array("theta"), lrs = reader.array("lrs"),
                            weights = reader.array("step_weights"), sx = reader.array("support_x"),
                            sy = reader.array("support_y"), qx = reader.array("query_x"), qy = reader.array("query_y");
  const std::vector<double> meta_loss = reader.array("meta_loss"), task_losses = reader.array("task_losses"),
                            pre_losses = reader.array("pre_losses"), grad_theta = reader.array("grad_theta"),
                            grad_lrs = reader.array("grad_lrs");
  const std::vector<int64_t> support_labels = as_labels(sy), query_labels = as_labels(qy);
  const pymaml::MetaBatch<double> batch{tasks, theta.data(), lrs.data(), weights.data(), sx.data(),
                                        c.labels ? nullptr : sy.data(), c.labels ? support_labels.data() : nullptr,
                                        qx.data(), c.labels ? nullptr : qy.data(),
                                        c.labels ? query_labels.data() : nullptr};
  const size_t P = size_t(c.spec.num_params);
  std::vector<double> out_loss(1), out_task(static_cast<size_t>(tasks)), out_pre(static_cast<size_t>(tasks)),
      out_steps(static_cast<size_t>(steps)), out_grad(P), out_grad_lrs(lr_grad ? static_cast<size_t>(steps) * P : 0);
  const pymaml::MetaResult<double> result{out_loss.data(), out_task.data(), out_pre.data(), out_steps.data(),
                                          out_grad.data(), lr_grad ? out_grad_lrs.data() : nullptr};
  const pymaml::MetaStepShape shape{steps, support, query, first_order, lr_grad, true};
  pymaml::meta_step_cpu<double>(c.spec, shape, batch, result, 1);
  return compare(c.name, {{"meta_loss", out_loss, meta_loss}, {"task_losses", out_task, task_losses},
                          {"pre_losses", out_pre, pre_losses}, {"grad_theta", out_grad, grad_theta},
                          {"grad_lrs", out_grad_lrs, grad_lrs}},
                 tolerance);
}

bool run_hvp(Reader& reader, double tolerance) {
  const Case c = read_spec(reader);
  const int tasks = int(reader.integer("tasks")), points = int(reader.integer("points"));
  const std::vector<double> theta = reader.array("theta"), v = reader.array("v"), x = reader.array("x"),
                            y = reader.array("y"), hv = reader.array("hv"), grad = reader.array("grad");
  const std::vector<int64_t> labels = as_labels(y);
  std::vector<double> out_hv(theta.size()), out_grad(theta.size());
  pymaml::hvp_cpu<double>(c.spec, tasks, points, theta.data(), v.data(), x.data(), c.labels ? nullptr : y.data(),
                              c.labels ? labels.data() : nullptr, out_hv.data(), out_grad.data(), 1);
  return compare(c.name, {{"hv", out_hv, hv}, {"grad", out_grad, grad}}, tolerance);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    std::fprintf(stderr, "usage: %s CASES_FILE [TOLERANCE]\n", argv[0]);
    return 2;
  }
  const double tolerance = argc == 3 ? std::strtod(argv[2], nullptr) : 1e-10;
  try {
    Reader reader(argv[1]);
    reader.expect("pymaml-oracle-cases");
    reader.expect("1");
    const int64_t count = std::stoll(reader.word());
    int64_t passed = 0;
    for (int64_t i = 0; i < count; ++i) {
      const std::string kind = reader.word();
      if (kind == "meta_step") {
        passed += run_meta_step(reader, tolerance);
      } else if (kind == "hvp") {
        passed += run_hvp(reader, tolerance);
      } else {
        throw std::runtime_error("unknown case kind " + kind);
      }
    }
    std::printf("oracle_check: %lld of %lld cases within %g\n", static_cast<long long>(passed),
                static_cast<long long>(count), tolerance);
    return passed == count ? 0 : 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "oracle_check: %s\n", error.what());
    return 2;
  }
}
