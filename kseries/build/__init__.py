"""Build a kernel from a base config plus configs/ fragments: incremental, with progress, a log,
a failure summary and a manifest that says exactly which kernel was built.

Three concepts, tuxmake-style:

- `BuildConfig` (fragments.py): the base config (tinyconfig, defconfig or a .config file) and
  the fragments, merged with the tree's own `scripts/kconfig/merge_config.sh` and `make
  olddefconfig`, then checked: every option a fragment asked for must have survived, or the
  error names the option and the Kconfig dependency that dropped it (kconfig.py reads why).
- `MakeRun` (make.py): one `make` run in the build directory (`O=`), driven through its own
  quiet-mode lines (`  CC      path`) into a progress bar, logged in full to a file, and
  turned into a one-line error with the first compiler or linker error on failure
  (failure.py).
- `Manifest` (manifest.py): the JSON record written next to the kernel image (tree, branch,
  commit, kernel release, utsversion, image and config sha256, fragments, wall time, ccache
  hit rate).

Targets, the tools they need and make's environment (distcc, ccache) are toolchain.py.
`Build` (orchestrate.py) composes them: it checks every input as it is made, then runs the
configure, make and manifest phases; `build()` runs one, and `invoke build` calls it. The
build directory defaults to ~/.cache/kseries/build/<tree-key>/ and is kept between runs, so a
rebuild is incremental. The toolkit's own files live in its `kseries/` subdirectory (log, step
counts, config stamp); ~/.cache/kseries/build/last.json points at the newest kernel image for
the test-box stage.
"""

from kseries.build.failure import STEP, WARNING, BuildError, failure
from kseries.build.fragments import BASES, BuildConfig, Fragment, read_config
from kseries.build.kconfig import KconfigIndex, Reason
from kseries.build.make import MakeRun, Outcome
from kseries.build.manifest import (
    STATE_VERSION,
    FileId,
    Manifest,
    kernelrelease,
    last_build,
    sha256_file,
    summary,
    utsversion,
)
from kseries.build.orchestrate import (
    BUILD,
    Build,
    build,
    check_kernel_tree,
)
from kseries.build.toolchain import (
    IMAGE,
    PACKAGES,
    TOOLS,
    Target,
    ccache_stats,
    check_tools,
    distcc_jobs,
)
from kseries.paths import build_dir as default_build_dir
from kseries.paths import tree_key

__all__ = [
    "BASES",
    "BUILD",
    "IMAGE",
    "PACKAGES",
    "STATE_VERSION",
    "STEP",
    "TOOLS",
    "WARNING",
    "Build",
    "BuildConfig",
    "BuildError",
    "FileId",
    "Fragment",
    "KconfigIndex",
    "MakeRun",
    "Manifest",
    "Outcome",
    "Reason",
    "Target",
    "build",
    "ccache_stats",
    "check_kernel_tree",
    "check_tools",
    "default_build_dir",
    "distcc_jobs",
    "failure",
    "kernelrelease",
    "last_build",
    "read_config",
    "sha256_file",
    "summary",
    "tree_key",
    "utsversion",
]
