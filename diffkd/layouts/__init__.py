"""Layout adapters, one module per pipeline family (see ``diffkd.layouts.base``), and the one place that picks the
adapter of a pipeline."""

from __future__ import annotations

from diffkd.errors import DiffkdError
from diffkd.layouts.base import ADDED, Layout
from diffkd.layouts.flux import FluxLayout
from diffkd.layouts.ldm import LDMLayout
from diffkd.layouts.pixart import PixArtLayout
from diffkd.layouts.sana import SanaLayout
from diffkd.layouts.sd3 import SD3Layout
from diffkd.layouts.sdxl import SDXLLayout

# Most specific first: SDXL and LDM are also UNet pipelines.
LAYOUTS: tuple[type[Layout], ...] = (FluxLayout, SD3Layout, SanaLayout, PixArtLayout, SDXLLayout, LDMLayout,
                                     Layout)
TAKEN = ("DDPM/DDIM, unconditional latent diffusion (LDMPipeline), Stable Diffusion 1.x/2.x, SDXL, SD3/3.5, Flux.1, "
         "SANA and PixArt-Sigma pipelines")

__all__ = ["ADDED", "LAYOUTS", "Layout", "layout_of"]


def layout_of(pipeline, source: str = "pipeline") -> Layout:
    """The layout adapter of ``pipeline``; a pipeline of no family diffkd knows is refused in one line."""
    for layout in LAYOUTS:
        if layout.matches(pipeline):
            return layout()
    network = next((name for name in ("transformer", "prior", "decoder") if getattr(pipeline, name, None)
                    is not None), None)
    what = f"its network is a {type(getattr(pipeline, network)).__name__}" if network else "it has no 'unet'"
    raise DiffkdError(f"{source!r} is a {type(pipeline).__name__}, which diffkd cannot take ({what}); diffkd "
                      f"distils {TAKEN}")
