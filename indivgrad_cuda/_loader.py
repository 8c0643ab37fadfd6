"""Loads the compiled extension, refusing a build made for another torch.

The compiled module is tied to the torch it was built against (C++ ABI, dispatcher), so a
mismatch is an ImportError that says what was built, what is installed, and how to rebuild.
"""

import json
from pathlib import Path

import torch

REBUILD = "Rebuild it against the installed torch: pip install --no-build-isolation -e .  (from the source tree)"
_INFO_PATH = Path(__file__).with_name("_build_info.json")


def read_build_info():
    if not _INFO_PATH.exists():
        raise ImportError(
            f"indivgrad_cuda: the compiled extension is missing (no {_INFO_PATH.name} beside the package). {REBUILD}"
        )
    return json.loads(_INFO_PATH.read_text())


def load_extension():
    info = read_build_info()
    if info["torch"] != torch.__version__:
        raise ImportError(
            f"indivgrad_cuda was built for torch {info['torch']} (CUDA {info['torch_cuda']}), "
            f"but torch {torch.__version__} (CUDA {torch.version.cuda}) is installed. {REBUILD}"
        )
    try:
        from indivgrad_cuda import _C
    except ImportError as e:
        raise ImportError(f"indivgrad_cuda: the compiled extension failed to load ({e}). {REBUILD}") from e
    return _C, info
