"""The benches' console: tables on stdout, progress on stderr as one tqdm bar whose line names
the step that is running, and the known warnings of the libraries we compare against silenced,
in the benches only (the library and the tests leave every warning as it is).

    progress = console.Progress(total_steps, quiet=args.quiet)
    progress.start("setup method")   # the previous step counts as done
    with progress.paused():          # print tables without tearing the bar
        print(...)
    progress.close()
"""

import contextlib
import logging
import sys
import warnings

from tqdm import tqdm


def add_quiet_flag(parser):
    parser.add_argument("--quiet", action="store_true", help="no progress bar (for logs); the tables are the same")


def silence_peer_warnings():
    """Known, harmless warnings that other libraries raise on every call while we time them."""
    # Opacus's GradSampleModule hooks each layer with a full backward hook; our inputs need no
    # gradient, so torch warns at each backward that the hook sees only the module's outputs,
    # which are all that Opacus reads.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    # Opacus's PrivacyEngine notes that its noise does not come from a cryptographic RNG unless
    # secure_mode is on: these runs measure speed and accuracy, not a deployment.
    warnings.filterwarnings("ignore", message="Secure RNG turned off", module="opacus")
    # torch.func's vmap has no batching rule for some scaled_dot_product_attention kernels (the
    # CPU flash kernel and its backward, which Hugging Face's default "sdpa" attention calls)
    # and says so once: it then loops over the samples, and the torch_func rows' times are
    # what that costs (bench/README.md says so where it reports them).
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
    # torch.compile's C++ backend imports torch.utils.cpp_extension, which logs on a machine
    # without a GPU that it found no CUDA runtime; the CPU compiler is the one being measured.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


class Progress:
    """A bar over a bench's steps on stderr (nothing with quiet=True), cleared when closed."""

    def __init__(self, total, quiet=False, unit="step"):
        self._bar = tqdm(total=total, unit=unit, file=sys.stderr, disable=quiet, leave=False, dynamic_ncols=True)
        self._running = False

    def start(self, what):
        if self._running:
            self._bar.update(1)
        self._running = True
        self._bar.set_description_str(what)

    @contextlib.contextmanager
    def paused(self):
        """Hide the bar while the block prints to stdout, then draw it again below."""
        with tqdm.external_write_mode(file=sys.stdout):
            yield

    def close(self):
        if self._running:
            self._bar.update(1)
        self._bar.close()
