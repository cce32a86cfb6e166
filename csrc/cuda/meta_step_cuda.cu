#include "meta_step_cuda.h"

#include <cuda/atomic>
#include <cuda_runtime.h>

#include "../core/meta_step_grid.h"
#include "../core/network_task.h"
#include "block_products.h"

namespace pymaml {
namespace {

// The thread-group policy of the per-task math on CUDA: the threads of one block.
struct BlockGroup {
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
};

// The grid policy of meta_step_grid (csrc/core/meta_step_grid.h) on CUDA: the blocks of the
// launch, the completion counter as a device-scope atomic, and L1-bypassing reads of the other
// blocks' results (__ldcg: cached in L2 only, which every SM sees coherently).
struct CudaGrid {
  bool* last;  // __shared__

  __device__ int block() const { return blockIdx.x; }
  __device__ int blocks() const { return gridDim.x; }
  __device__ bool& last_flag() const { return *last; }
  // The acquire-release increment at device scope is the CUDA guide's last-block pattern
  // (__threadfence(), atomicAdd, and the last block's __threadfence() before its reads) written
  // as one ordered operation.
  __device__ unsigned int arrive(unsigned int* counter) const {
    cuda::atomic_ref<unsigned int, cuda::thread_scope_device> count(*counter);
    return count.fetch_add(1u, cuda::std::memory_order_acq_rel);
  }
  __device__ void reset(unsigned int* counter) const {
    cuda::atomic_ref<unsigned int, cuda::thread_scope_device> count(*counter);
    count.store(0u, cuda::std::memory_order_relaxed);  // the kernel's end orders it before the next launch
  }
  template <class T>
  __device__ T load(const T* p) const {
    return __ldcg(p);
  }
};

template <class T>
__global__ void __launch_bounds__(kCudaThreadsPerBlock)
    meta_step_kernel(Network s, MetaStepShape m, MetaBatch<T> b, MetaResult<T> r, T* workspace,
                     unsigned int* counter, int* labels_ok) {
  __shared__ bool last;
  meta_step_grid<BlockProducts>(BlockGroup{}, CudaGrid{&last}, s, m, b, r, workspace, counter, labels_ok);
}

// Makes `device` current for its lifetime and then restores the device that was current before.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    error_ = cudaGetDevice(&previous_);
    if (error_ == cudaSuccess && previous_ != device) {
      error_ = cudaSetDevice(device);
      changed_ = error_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  cudaError_t error() const { return error_; }

 private:
  int previous_ = 0;
  bool changed_ = false;
  cudaError_t error_;
};

}  // namespace

template <class T>
std::string meta_step_cuda(const Network& spec, const MetaStepShape& shape, const MetaBatch<T>& batch,
                           const MetaResult<T>& result, T* workspace, unsigned int* counter, int* labels_ok,
                           int device, int blocks, int threads_per_block, void* stream) {
  const DeviceGuard guard(device);
  if (guard.error() != cudaSuccess) {
    return std::string("cannot make device ") + std::to_string(device) + " current: " + cudaGetErrorString(guard.error());
  }
  cudaFuncAttributes attributes;
  cudaError_t error = cudaFuncGetAttributes(&attributes, meta_step_kernel<T>);
  if (error != cudaSuccess) return cudaGetErrorString(error);
  if (threads_per_block > attributes.maxThreadsPerBlock) {
    return "the kernel (" + std::to_string(attributes.numRegs) + " registers a thread) runs at most " +
           std::to_string(attributes.maxThreadsPerBlock) + " threads a block, but " +
           std::to_string(threads_per_block) + " were asked for";
  }
  meta_step_kernel<T><<<blocks, threads_per_block, 0, static_cast<cudaStream_t>(stream)>>>(
      spec, shape, batch, result, workspace, counter, labels_ok);
  error = cudaGetLastError();
  return error == cudaSuccess ? std::string() : std::string(cudaGetErrorString(error));
}

template std::string meta_step_cuda<float>(const Network&, const MetaStepShape&, const MetaBatch<float>&,
                                           const MetaResult<float>&, float*, unsigned int*, int*, int, int, int,
                                           void*);
template std::string meta_step_cuda<double>(const Network&, const MetaStepShape&, const MetaBatch<double>&,
                                            const MetaResult<double>&, double*, unsigned int*, int*, int, int, int,
                                            void*);

}  // namespace pymaml
