// Elementary functions for float and double on every launcher.
#pragma once

#include <cmath>

#include "common.h"

namespace pymaml {

PYMAML_HD float math_tanh(float x) { return ::tanhf(x); }
PYMAML_HD double math_tanh(double x) { return ::tanh(x); }
PYMAML_HD float math_exp(float x) { return ::expf(x); }
PYMAML_HD double math_exp(double x) { return ::exp(x); }
PYMAML_HD float math_log(float x) { return ::logf(x); }
PYMAML_HD double math_log(double x) { return ::log(x); }

}  // namespace pymaml
