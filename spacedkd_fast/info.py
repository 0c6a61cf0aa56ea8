"""``python -m spacedkd_fast.info``: how the extension was built and what torch sees now."""

from __future__ import annotations

import json
import platform
import sys

import torch


def collect() -> dict:
    from spacedkd_fast import __version__, ops

    build = ops.build_info()
    info = {
        "spacedkd_fast": __version__,
        "build": build,
        "cuda_kernels_registered": torch._C._dispatch_has_kernel_for_dispatch_key(
            "spacedkd::kd_loss_forward", "CUDA"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import nvidia.dali as dali

        info["dali"] = dali.__version__
    except ImportError:
        info["dali"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m spacedkd_fast.info [--json]\n\n"
              "Prints how spacedkd_fast's extension was built (version, torch it was compiled\n"
              "against, CUDA kernels compiled and for which architectures) and what torch sees\n"
              "now (CUDA devices, threads, DALI).")
        return 0
    try:
        info = collect()
    except ImportError as exc:  # no usable compiled extension: the message says what to run
        print(f"spacedkd_fast.info: {exc}", file=sys.stderr)
        return 2
    if argv and argv[0] == "--json":
        print(json.dumps(info, indent=2))
        return 0
    build = info["build"]
    print(f"spacedkd_fast {info['spacedkd_fast']}")
    print(f"  built against torch {build['torch_version']}, CUDA kernels: "
          f"{'yes (CUDA ' + build['cuda_version'] + ', arch ' + build['cuda_arch_list'] + ')' if build['cuda'] else 'no'}")
    print(f"  CUDA kernels registered with the dispatcher: {info['cuda_kernels_registered']}")
    print(f"torch {info['torch']} (CUDA {info['torch_cuda']}), CUDA available: {info['cuda_available']}")
    for i, name in enumerate(info["devices"]):
        print(f"  cuda:{i} {name}")
    print(f"CPU threads: {info['cpu_threads']}; DALI: {info['dali'] or 'not installed'}")
    print(f"Python {info['python']} on {info['platform']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
