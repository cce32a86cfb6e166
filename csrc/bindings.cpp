// pybind11 bindings of the torch-free core.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#include "build_info.h"
#include "pymaml_build_config.h"

namespace py = pybind11;

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
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymaml's torch-free C++ core";
  m.def("build_info", &build_info, "Compiler, flags, OpenMP and CUDA archs of this build.");
}
