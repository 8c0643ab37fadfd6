"""python -m indivgrad_cuda: how this copy was built and whether a GPU is usable."""

import torch

import indivgrad_cuda


def main():
    info = indivgrad_cuda.build_info()
    print(f"indivgrad_cuda {info['build_version']}")
    for key in ("torch", "torch_cuda", "nvcc", "cuda_arch_list", "cuda_kernels", "why", "python"):
        print(f"  built with {key}: {info.get(key)}")
    print(f"  running torch: {torch.__version__} (CUDA {torch.version.cuda})")
    if not info["cuda_kernels"]:
        print("  GPU: not usable by this build (CPU kernels only)")
    elif torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        print(f"  GPU: usable, {torch.cuda.get_device_name()} (sm_{major}{minor})")
    else:
        print("  GPU: none visible (CUDA kernels compiled, CPU path in use)")


if __name__ == "__main__":
    main()
