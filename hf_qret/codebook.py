"""Trainable PQ codebooks (JPQ-style): the centroids of the quantized index as ``nn.Parameter``\\ s.

A product-quantized index stores, for every document, one centroid id per sub-space; a document's stored vector is
the concatenation of those centroids (rotated back by the OPQ matrix when there is one). :class:`TrainableCodebooks`
holds the centroids as a parameter and the codes as a buffer, so candidates can be scored against exactly what the
index stores and the loss can move the centroids. Every document that shares a centroid benefits, including the
documents that were never a training positive or a mined negative. After each optimizer step the centroids are
written back into the FAISS index, so mining searches the learned codebooks too; an index refresh re-encodes the
bank with them.

Supported indexes: ``PQ<M>`` and ``OPQ<M>,PQ<M>`` (8-bit codes), the 8- to 32-byte indexes hf-qret targets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .index import QuantizedIndex, split_pretransform

__all__ = ["TrainableCodebooks", "supports_codebook_learning"]


def _parts(index: QuantizedIndex) -> tuple[Any, Any | None]:
    """The inner ``IndexPQ`` and the orthonormal pre-rotation (``None`` without OPQ); raises ConfigError otherwise."""
    faiss = index.faiss
    transforms, inner = split_pretransform(faiss, index.index)
    rotation = None
    if transforms:
        if len(transforms) != 1:
            raise ConfigError(
                f"codebook learning supports one OPQ rotation before PQ, not {index.factory!r}; use 'OPQ16,PQ16'."
            )
        transform = transforms[0]
        if not isinstance(transform, faiss.LinearTransform) or not transform.is_orthonormal or transform.have_bias:
            raise ConfigError(
                f"codebook learning needs an orthonormal rotation (OPQ) before PQ, not {index.factory!r}."
            )
        rotation = transform
    if not isinstance(inner, faiss.IndexPQ) or inner.pq.nbits != 8:
        raise ConfigError(
            f"codebook learning (--learn_codebooks) supports 'PQ<M>' and 'OPQ<M>,PQ<M>' indexes with 8-bit codes, "
            f"not {index.factory!r}; turn it off or use e.g. --index_factory 'OPQ16,PQ16'."
        )
    return inner, rotation


def supports_codebook_learning(index: QuantizedIndex) -> bool:
    """Whether :class:`TrainableCodebooks` can wrap ``index``."""
    try:
        _parts(index)
    except ConfigError:
        return False
    return True


class TrainableCodebooks(nn.Module):
    """The PQ centroids of a (OPQ+)PQ :class:`~hf_qret.index.QuantizedIndex` as a trainable parameter.

    ``reconstruct(rows)`` decodes the stored codes of bank rows with the *current* centroids, differentiably with
    respect to the centroids; :meth:`write_back` copies the centroids into the FAISS index; :meth:`sync` reloads the
    codes (and, after a codebook retraining, the centroids and rotation) from the index.

    Args:
        index: A trained ``PQ<M>`` or ``OPQ<M>,PQ<M>`` index over the bank.

    Example:
        >>> import numpy as np, torch
        >>> vectors = np.random.default_rng(0).standard_normal((1000, 16)).astype("float32")
        >>> index = QuantizedIndex(16, "OPQ4,PQ4"); index.build(vectors)
        >>> codebooks = TrainableCodebooks(index)
        >>> decoded = codebooks.reconstruct(torch.tensor([0, 1]))
        >>> bool(np.allclose(decoded.detach().numpy(), index.reconstruct_all()[:2], atol=1e-5))
        True
    """

    def __init__(self, index: QuantizedIndex) -> None:
        super().__init__()
        self.index = index
        pq, _ = _parts(index)
        self.num_subspaces = int(pq.pq.M)
        self.num_centroids = int(pq.pq.ksub)
        self.sub_dim = int(pq.pq.dsub)
        self.centroids = nn.Parameter(torch.zeros(self.num_subspaces, self.num_centroids, self.sub_dim))
        self.register_buffer("rotation", torch.eye(index.dim), persistent=False)
        self.register_buffer("codes", torch.zeros(0, self.num_subspaces, dtype=torch.long), persistent=False)
        self.has_rotation = False
        self.index_version = -1
        self._synced_index: Any = None
        self.sync(reload_centroids=True)

    def maybe_sync(self) -> bool:
        """Resyncs after the index changed; returns ``True`` when the codebooks were retrained (centroids reloaded).

        A re-encoding refresh only changes the codes; a retraining refresh (a new FAISS index object) also replaces
        the centroids and the rotation, so an optimizer over :attr:`centroids` should reset its state.
        """
        if self.index_version == self.index.version:
            return False
        retrained = self.index.index is not self._synced_index
        self.sync(reload_centroids=retrained)
        return retrained

    @torch.no_grad()
    def sync(self, reload_centroids: bool = False) -> None:
        """Reloads the codes from the index; with ``reload_centroids`` also the centroids and the rotation."""
        faiss = self.index.faiss
        pq, rotation = _parts(self.index)
        device = self.centroids.device
        if reload_centroids:
            centroids = faiss.vector_to_array(pq.pq.centroids).reshape(self.num_subspaces, self.num_centroids, -1)
            self.centroids.data.copy_(torch.from_numpy(centroids))
            self.has_rotation = rotation is not None
            if rotation is not None:
                matrix = faiss.vector_to_array(rotation.A).reshape(rotation.d_out, rotation.d_in)
                self.rotation = torch.from_numpy(matrix).to(device)
        codes = faiss.vector_to_array(pq.codes).reshape(-1, self.num_subspaces)
        self.codes = torch.from_numpy(codes.astype(np.int64)).to(device)
        self.index_version = self.index.version
        self._synced_index = self.index.index

    def reconstruct(self, rows: torch.Tensor) -> torch.Tensor:
        """The vectors the index stores for bank ``rows`` (``(n, dim)``), differentiable in :attr:`centroids`."""
        codes = self.codes[rows.to(self.codes.device)]  # (n, M)
        subspace = torch.arange(self.num_subspaces, device=codes.device).expand_as(codes)
        rotated = self.centroids[subspace, codes].reshape(codes.shape[0], -1)  # (n, M * dsub)
        if self.has_rotation:
            return rotated @ self.rotation  # OPQ: x = A^T y, as row vectors y @ A
        return rotated

    @torch.no_grad()
    def write_back(self) -> None:
        """Copies the current centroids into the FAISS index (searches and re-encoding then use them)."""
        faiss = self.index.faiss
        pq, _ = _parts(self.index)
        array = np.ascontiguousarray(self.centroids.detach().float().cpu().numpy().reshape(-1))
        faiss.copy_array_to_vector(array, pq.pq.centroids)
        pq.pq.clear_transposed_centroids()
        self.index.codebooks_changed()
