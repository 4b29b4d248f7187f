"""Vector quantizer with an l2-normalised codebook (LlamaGen / ViT-VQGAN style).

Both the encoder output and the codewords are projected onto the unit sphere
before the nearest-neighbour lookup, which keeps a large low-dimensional
codebook well used. Gradients pass straight through the lookup.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQOutput:
    quantized: torch.Tensor  # [B, D, h, w], straight-through
    codes: torch.Tensor  # [B, h, w]
    latents: torch.Tensor  # [B*h*w, D], unit-normalised encoder outputs (candidates for re-seeding)
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.codebook_loss + self.commitment_loss


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, chunk: int = 8192):
        super().__init__()
        self.codebook_size, self.dim, self.beta, self.chunk = codebook_size, dim, beta, chunk
        self.embedding = nn.Parameter(F.normalize(torch.randn(codebook_size, dim), dim=-1))

    @property
    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding, dim=-1)

    def nearest(self, z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codewords for unit vectors z [N, D], in chunks to bound memory."""
        # for unit vectors, the smallest Euclidean distance is the largest dot product
        return torch.cat([(part @ codebook.T).argmax(dim=1) for part in z.split(self.chunk)]) if len(z) else z.new_zeros(0, dtype=torch.long)

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z.permute(0, 2, 3, 1).reshape(-1, self.dim), dim=-1)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, D, h, w] -> codes [B, h, w]."""
        b, _, h, w = z.shape
        return self.nearest(self._flatten(z), self.codebook).view(b, h, w)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> unit codewords [B, D, h, w]."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> VQOutput:
        b, _, h, w = z.shape
        flat = self._flatten(z)
        codebook = self.codebook
        codes = self.nearest(flat.detach(), codebook.detach())
        quant = codebook[codes]
        codebook_loss = F.mse_loss(quant, flat.detach())
        commitment_loss = self.beta * F.mse_loss(flat, quant.detach())
        quant = flat + (quant - flat).detach()
        quantized = quant.view(b, h, w, self.dim).permute(0, 3, 1, 2)
        return VQOutput(quantized, codes.view(b, h, w), flat.detach(), codebook_loss, commitment_loss)

    @torch.no_grad()
    def reseed(self, dead: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Move the codewords flagged in `dead` [V] onto randomly chosen encoder outputs [N, D]."""
        idx = dead.nonzero().flatten()
        if len(idx) == 0 or len(candidates) == 0:
            return 0
        pick = torch.randint(len(candidates), (len(idx),), generator=generator, device=candidates.device)
        noise = 0.01 * torch.randn(len(idx), self.dim, generator=generator, device=candidates.device)
        self.embedding[idx] = F.normalize(candidates[pick] + noise, dim=-1).to(self.embedding.dtype)
        return len(idx)
