// The project's CUDA kernels, run under the GPU simulator through their own launch code
// (csrc/cuda/*_kernels.cuh, which the ops call too): grid sizes, launch sequences and argument
// structs come from there, never from here. This program only moves data: for each request folder
// named on the command line (written by check_kernels.py) it reads request.txt and the inputs'
// raw bytes, launches one op, and writes the outputs' raw bytes and the op's device flags back.
//
// request.txt holds one "key value..." line per argument:
//   op        sinkhorn | similarity_forward | similarity_backward | update_prototypes | rectify
//   dtype     float64 | float32 | float16 (of the floating tensors); prior_dtype, label_dtype
//   NAME      offset stride... of input NAME, whose storage is NAME.bin (elements, not bytes)
//   NAME_numel  elements of output NAME (written to NAME.bin; outputs start as NaN bytes, so an
//               element a kernel forgets shows up)
//   metric    cosine | euclidean (the similarity ops)
// Any other key is a number the op takes. A failed launch check writes error.txt and moves on.
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "prototype_update_kernels.cuh"
#include "rectify_kernels.cuh"
#include "similarity_kernels.cuh"
#include "sinkhorn_kernels.cuh"

namespace cpsl_ops {
namespace gpusim {

using Half = torch::headeronly::Half;

// cudaMalloc'd memory of one request: its inputs, outputs and the ops' working memory.
class DeviceMemory final : public cuda::Workspace {
 public:
  ~DeviceMemory() override {
    (void)cudaDeviceSynchronize();
    for (void* block : blocks_) (void)cudaFree(block);
  }

 protected:
  void* allocate(size_t bytes) override {
    void* block = nullptr;
    CPSL_CUDA_CHECK(cudaMalloc(&block, bytes));
    blocks_.push_back(block);
    return block;
  }

 private:
  std::vector<void*> blocks_;
};

class Request {
 public:
  explicit Request(std::string folder) : folder_(std::move(folder)) {
    std::ifstream in(folder_ + "/request.txt");
    CPSL_CHECK(in.good(), "cannot read ", folder_, "/request.txt");
    for (std::string line; std::getline(in, line);) {
      std::istringstream words(line);
      std::string key;
      words >> key;
      std::vector<std::string> values{std::istream_iterator<std::string>(words), {}};
      if (!key.empty()) values_[key] = values;
    }
  }

  const std::string& folder() const { return folder_; }
  const std::string& text(const std::string& key) const { return values(key, 1)[0]; }
  int64_t integer(const std::string& key) const { return std::stoll(text(key)); }
  double real(const std::string& key) const { return std::stod(text(key)); }
  bool has(const std::string& key) const { return values_.count(key) != 0; }
  cuda::Strides3d strides3d(const std::string& name) const {
    const auto& v = values(name, 4);
    return {std::stoll(v[1]), std::stoll(v[2]), std::stoll(v[3])};
  }
  int64_t stride(const std::string& name, int dim) const { return std::stoll(values(name, dim + 2)[dim + 1]); }

  // Input NAME on the device, at its offset into NAME.bin.
  template <typename T>
  const T* input(const std::string& name) {
    std::ifstream in(folder_ + "/" + name + ".bin", std::ios::binary);
    const std::vector<char> bytes{std::istreambuf_iterator<char>(in), {}};
    T* device = memory_.take<T>(static_cast<int64_t>(bytes.size() / sizeof(T)));
    CPSL_CUDA_CHECK(cudaMemcpy(device, bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
    return device + std::stoll(values(name, 1)[0]);
  }

  // Output NAME on the device, filled with NaN bytes; written to NAME.bin by finish().
  template <typename T>
  T* output(const std::string& name) {
    const int64_t numel = integer(name + "_numel");
    T* device = memory_.take<T>(numel);
    CPSL_CUDA_CHECK(cudaMemset(device, 0xff, sizeof(T) * numel));
    outputs_.push_back({name, device, sizeof(T) * numel});
    return device;
  }

  // Device flags, zero on entry as the ops' DeviceFlags; written to flags.txt by finish().
  int32_t* flags(int count) {
    flags_ = memory_.take<int32_t>(count);
    num_flags_ = count;
    CPSL_CUDA_CHECK(cudaMemset(flags_, 0, sizeof(int32_t) * count));
    return flags_;
  }

  cuda::Workspace& workspace() { return memory_; }

  void finish() {
    CPSL_CUDA_CHECK(cudaDeviceSynchronize());
    for (const auto& out : outputs_) {
      std::vector<char> bytes(out.bytes);
      CPSL_CUDA_CHECK(cudaMemcpy(bytes.data(), out.device, out.bytes, cudaMemcpyDeviceToHost));
      std::ofstream(folder_ + "/" + out.name + ".bin", std::ios::binary).write(bytes.data(), bytes.size());
    }
    std::vector<int32_t> flags(num_flags_);
    if (num_flags_ > 0)
      CPSL_CUDA_CHECK(cudaMemcpy(flags.data(), flags_, sizeof(int32_t) * num_flags_, cudaMemcpyDeviceToHost));
    std::ofstream text(folder_ + "/flags.txt");
    for (int32_t flag : flags) text << flag << " ";
  }

 private:
  const std::vector<std::string>& values(const std::string& key, size_t count) const {
    const auto found = values_.find(key);
    CPSL_CHECK(found != values_.end() && found->second.size() >= count, folder_, ": request lacks '", key, "'");
    return found->second;
  }

  struct Output {
    std::string name;
    const void* device;
    size_t bytes;
  };
  std::string folder_;
  std::map<std::string, std::vector<std::string>> values_;
  DeviceMemory memory_;
  std::vector<Output> outputs_;
  int32_t* flags_ = nullptr;
  int num_flags_ = 0;
};

template <typename Body>
void dispatch_floating(const std::string& dtype, Body&& body) {
  if (dtype == "float64") return body(double{});
  if (dtype == "float32") return body(float{});
  CPSL_CHECK(dtype == "float16", "unsupported dtype ", dtype);
  body(Half{});
}

template <typename Body>
void dispatch_labels(const std::string& dtype, Body&& body) {
  if (dtype == "int64") return body(int64_t{});
  if (dtype == "int32") return body(int32_t{});
  CPSL_CHECK(dtype == "uint8", "unsupported label dtype ", dtype);
  body(uint8_t{});
}

template <typename scalar_t, typename prior_t>
void sinkhorn(Request& r) {
  using namespace sinkhorn_kernels;
  LaunchOptions options;  // grid.sync() does not run here: the phases run one launch each
  options.path = LaunchPath::kPerPass;
  if (r.has("max_blocks")) options.max_blocks = r.integer("max_blocks");
  launch_balanced_sinkhorn<scalar_t, prior_t>(
      {r.input<scalar_t>("scores"), r.integer("batch"), r.integer("samples"), r.integer("classes"),
       r.stride("scores", 0), r.stride("scores", 1), r.input<prior_t>("prior"), r.stride("prior", 0),
       r.stride("prior", 1), r.real("epsilon"), r.integer("num_iters"), r.output<scalar_t>("assignment"),
       r.flags(kNumFlags)},
      options, r.workspace(), nullptr);
}

template <typename scalar_t>
similarity_kernels::SimilarityInputs<scalar_t> similarity_inputs(Request& r) {
  return {r.input<scalar_t>("features"), r.strides3d("features"), r.integer("batch"), r.integer("channels"),
          r.integer("pixels"), r.input<scalar_t>("prototypes"), r.stride("prototypes", 0),
          r.stride("prototypes", 1), r.integer("classes"), r.real("temperature"),
          similarity_metric(r.text("metric"))};
}

template <typename scalar_t>
void similarity_forward(Request& r) {
  similarity_kernels::launch_similarity_forward<scalar_t>(similarity_inputs<scalar_t>(r), r.output<scalar_t>("logits"),
                                                          r.strides3d("logits"), r.workspace(), nullptr);
}

template <typename scalar_t>
void similarity_backward(Request& r) {
  similarity_kernels::launch_similarity_backward<scalar_t>(
      similarity_inputs<scalar_t>(r), r.input<scalar_t>("grad_logits"), r.strides3d("grad_logits"),
      r.output<scalar_t>("grad_features"), r.strides3d("grad_features"), r.output<scalar_t>("grad_prototypes"),
      r.workspace(), nullptr);
}

template <typename scalar_t, typename label_t>
void update_prototypes(Request& r) {
  using namespace prototype_update_kernels;
  const Labels<label_t> labels{r.input<label_t>("labels"), r.stride("labels", 0), r.stride("labels", 1),
                               r.integer("batch"), r.integer("pixels")};
  launch_update_prototypes<scalar_t, label_t>(
      {r.input<scalar_t>("prototypes"), r.stride("prototypes", 0), r.stride("prototypes", 1), r.integer("classes"),
       r.integer("channels"), r.input<scalar_t>("features"), r.strides3d("features"), labels, r.real("momentum"),
       r.integer("ignore_index"), r.output<scalar_t>("new_prototypes"), r.output<int64_t>("counts"),
       r.flags(kNumFlags)},
      r.workspace(), nullptr);
}

template <typename scalar_t>
void rectify(Request& r) {
  rectify_kernels::launch_rectify<scalar_t>(
      {r.input<scalar_t>("soft"), r.strides3d("soft"), r.input<scalar_t>("logits"), r.strides3d("logits"),
       r.integer("batch"), r.integer("classes"), r.integer("pixels"), r.real("threshold"), r.integer("ignore_index"),
       r.output<int64_t>("labels"), r.output<scalar_t>("confidence"), r.flags(1)},
      nullptr);
}

void run(Request& r) {
  const std::string& op = r.text("op");
  dispatch_floating(r.text("dtype"), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (op == "sinkhorn") {
      dispatch_floating(r.text("prior_dtype"), [&](auto prior_tag) { sinkhorn<scalar_t, decltype(prior_tag)>(r); });
    } else if (op == "similarity_forward") {
      similarity_forward<scalar_t>(r);
    } else if (op == "similarity_backward") {
      similarity_backward<scalar_t>(r);
    } else if (op == "update_prototypes") {
      dispatch_labels(r.text("label_dtype"), [&](auto label_tag) { update_prototypes<scalar_t, decltype(label_tag)>(r); });
    } else {
      CPSL_CHECK(op == "rectify", "unknown op ", op);
      rectify<scalar_t>(r);
    }
  });
  r.finish();
}

}  // namespace gpusim
}  // namespace cpsl_ops

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    try {
      cpsl_ops::gpusim::Request request(argv[i]);
      cpsl_ops::gpusim::run(request);
    } catch (const std::exception& error) {
      std::ofstream(std::string(argv[i]) + "/error.txt") << error.what();
    }
    std::printf("done %s\n", argv[i]);
    std::fflush(stdout);
  }
  return 0;
}
