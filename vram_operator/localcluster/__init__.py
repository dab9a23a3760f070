"""A local Kubernetes control plane (etcd + kube-apiserver) for tests and demos.

Why: CI and developer machines have no container engine, so the operator is
tested against a real API server started from binaries that
``scripts/install-control-plane.sh`` builds and caches.
"""

from vram_operator.localcluster.controlplane import (
    ASSETS_ENV,
    INSTALL_HINT,
    KUBE_VERSION,
    USE_EXISTING_ENV,
    Binaries,
    BinariesNotFoundError,
    ControlPlaneError,
    LocalControlPlane,
    build_parser,
    cache_bin_dir,
    find_binaries,
    main,
)

__all__ = [
    "ASSETS_ENV",
    "INSTALL_HINT",
    "KUBE_VERSION",
    "USE_EXISTING_ENV",
    "Binaries",
    "BinariesNotFoundError",
    "ControlPlaneError",
    "LocalControlPlane",
    "build_parser",
    "cache_bin_dir",
    "find_binaries",
    "main",
]
