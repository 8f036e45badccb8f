"""The options of one locate request: the one place each is declared, with its default.

Settings (service/config.py) take their defaults from here, the HTTP request model
(service/api/schemas.py) and the CLI expose a subset, and tests/service/engine/test_options.py
checks that they agree. This module stays light (no torch, no faiss): the settings import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from index.geo import BBox
from service.errors import InvalidOptionError

#: The options of verification's reference neighbours.
NEIGHBOUR_OPTIONS = (
    "neighbours",
    "neighbour_weight",
    "neighbour_kernel_km",
    "neighbour_kernel_share",
    "neighbour_temperature",
    "structure_weight",
    "colour_weight",
    "colour_threshold",
    "near_copy_colour",
    "near_copy_km",
)
#: The options with a service-wide default, a setting each (GEOLOC_TOP_K, ...); the others
#: (stage switches, filters, ``temperature``) are chosen per request only.
SERVICE_OPTIONS = (
    "top_k",
    "retrieve_k",
    "refine_beam",
    "refine_width",
    "refine_levels",
    "refine_start_res",
    "nms_km",
    "region_share",
    "region_res",
    *NEIGHBOUR_OPTIONS,
    "llm_diversify",
    "llm_rerank",
    "nprobe",
    "rerank_k",
)
#: The options that shape the candidate logits a softmax temperature is fitted on: a
#: calibration records them, and `geoloc setup` fits a new one where the served ones differ.
LOGIT_OPTIONS = ("retrieve_k", "refine", "diversify", "nms_km", "verify", *NEIGHBOUR_OPTIONS)
#: How the pipeline scores candidates beyond its options (which references verification
#: searches, how a near copy leads): raised with every such change; a calibration records it
#: (as "scoring"), and `geoloc setup` fits a new one where it differs.
SCORING = 3


#: The widest album spread a setting or a request may ask for, in km.
MAX_SPREAD_KM = 2000.0
#: What an album's spread means (the setting's and the request option's description).
SPREAD_DOC = (
    "How far apart the album's pictures may have been taken, in km (one standard deviation; "
    "25: within about 50 km of one place): each picture's reference-neighbour kernels are "
    "widened by it before the pictures are combined, and the joint answer also weighs the mean "
    "of the pooled places near its first. 0: pictures of one spot (a burst, frames of a video)."
)


@dataclass(frozen=True)
class AlbumConfig:
    """How the pictures of an album are combined (service/engine/album.py;
    GEOLOC_ALBUM_*, ``Settings.album_config``)."""

    #: ε, the weight of the uniform component in each picture's likelihood.
    uniform: float = 0.05
    #: τ, the temperature of the joint: divides the weighted sum of the log-likelihoods.
    temperature: float = 1.0
    #: Pictures whose agreement with the joint answer is below this are outliers.
    outlier_below: float = 0.5
    #: How far apart, in km (one standard deviation), the pictures of one album may have been
    #: taken: each picture's reference-neighbour kernels are widened by it before the pictures
    #: are combined (sharp kernels of pictures a few tens of km apart must still overlap), and
    #: the mean of the pooled places within twice it of the joint answer's first is scored too.
    spread_km: float = 25.0
    #: The regions' spread, as a multiple of ``spread_km``: how much each region of the pool
    #: weighs comes from the pictures combined with kernels this much wider (album.py
    #: ``regional``; 1: one combination).
    region_spread: float = 3.0
    #: A pooled point's region: the pooled points within this multiple of ``spread_km``.
    #: (These two are the method's, chosen on benchmark draws like ROUNDS, not settings.)
    region_radius: float = 4.0

    @property
    def regions(self) -> bool:
        """Whether the pictures are combined under the regions' spread too."""
        return self.spread_km > 0 and self.region_spread > 1


@dataclass(frozen=True)
class ImageLimits:
    """What one picture may cost before it reaches the model, checked when it is decoded
    (GEOLOC_MAX_IMAGE_BYTES, _PIXELS, _ASPECT and GEOLOC_MAX_JPEG_SCANS), and when it is
    restored there (GEOLOC_DEBLOCK_ABOVE; ``Settings.image_limits``)."""

    max_bytes: int
    max_pixels: int
    #: Longest side over shortest side; None: any shape.
    max_aspect: float | None = None
    #: Most scans a JPEG may have (each scan is a pass over every block of the image, so a
    #: small file that repeats a scan a thousand times takes a minute to decode); None: any.
    max_jpeg_scans: int | None = None
    #: Blockiness (images.blockiness) from which a picture is smoothed; 0: never.
    deblock_above: float = 0.0


@dataclass(frozen=True)
class LocateOptions:
    """Per-request knobs. Defaults come from Settings; limits are checked in ``validate``."""

    top_k: int = 5
    retrieve_k: int = 128
    refine: bool = True
    diversify: bool = True
    verify: bool = True
    describe: bool = True
    #: Start cells to descend from, beam width under each, and levels below the gallery res.
    refine_beam: int = 5
    refine_width: int = 2
    refine_levels: int = 3
    #: Resolution at which CSV-gallery points enter the H3 hierarchy for refinement.
    refine_start_res: int = 4
    #: Candidates closer than this to a better one are merged into it.
    nms_km: float = 50.0
    region_share: float = 0.9
    region_res: int = 3
    #: "candidates": softmax over the candidate set; "gallery": over the whole gallery
    #: (GeoCLIP's normalisation, for comparison).
    normalization: str = "candidates"
    bbox: BBox | None = None
    countries: tuple[str, ...] = ()
    #: Reference images to retrieve (G3's Geo-alignment); 0 turns the stage part off.
    neighbours: int = 10
    return_neighbours: bool = False
    #: Verification adds weight·log(kernel density of the neighbours) to each logit;
    #: neighbours are weighted by softmax(temperature·image similarity).
    neighbour_weight: float = 1.0
    neighbour_kernel_km: float = 50.0
    #: A neighbour whose view width the reference index stores (its ``width_km`` column)
    #: gets a kernel of this share of that width where that is narrower than
    #: ``neighbour_kernel_km``: a narrow view places its match more precisely. 0: off.
    #: Chosen on validation draws (bench/tune.py --grid widths).
    neighbour_kernel_share: float = 0.06
    neighbour_temperature: float = 50.0
    #: The neighbours are ranked and weighted by cosine + structure_weight·(rank correlation
    #: of the picture's luminance layout with theirs, ``encoders.structure``), among the
    #: STRUCTURE_POOL nearest by cosine, the STRUCTURE_SEARCH nearest by layout and the
    #: COLOUR_SEARCH nearest in colour (service/engine/locator.py); 0 (or
    #: references without descriptors): cosine only. Chosen on validation draws
    #: (bench/tune.py --grid structure).
    structure_weight: float = 1.5
    #: ... and + colour_weight·(how closely the picture's colour thumbnail matches theirs,
    #: counted from colour_threshold up: ``encoders.structure.colour_agreement``), where the
    #: reference index stores thumbnails; 0: off. The layout and the embedding are blind to
    #: hue, and a narrow view's layout matches many places. Chosen on validation draws
    #: (bench/tune.py --grid colour).
    colour_weight: float = 0.5
    colour_threshold: float = 0.75
    #: A picture whose first reference neighbour (in that ranking) agrees in colour at least
    #: near_copy_colour (its ``colour`` in ``neighbours``, counted from colour_threshold, so
    #: it needs colour_weight > 0) and shows ground at most near_copy_km wide (its stored
    #: ``width_km``) is a near copy of that view: when verifying, with candidate
    #: normalisation, the reference's place becomes the first candidate (source
    #: ``near_copy``). A narrow view's embedding and layout match many places; a close colour
    #: match of a narrow reference places it. Wider references are centred too coarsely to
    #: overrule verification. near_copy_km 0: off. Chosen on validation draws
    #: (bench/tune.py --grid near_copy).
    near_copy_colour: float = 0.3
    near_copy_km: float = 400.0
    #: The optional LLM stages (service/engine/llm_stages.py): proposals that join the candidates,
    #: and a reranking among the returned candidates. Used only when an LLM is configured.
    llm_diversify: bool = True
    llm_rerank: bool = True
    #: Softmax temperature of verification (logits / temperature); None: the locator's
    #: calibration (``geoloc calibrate``), 1.0 without one.
    temperature: float | None = None
    #: IVF lists searched in a compressed index (gallery and reference images); 0: the
    #: index's own default, recorded in its manifest with the recall measured there.
    nprobe: int = 0
    #: Best candidates of a compressed index re-scored with its exact vectors (read from
    #: disk); None: the index's own depth (its manifest's ``rerank_k``), 0: off.
    rerank_k: int | None = None

    def validate(
        self,
        *,
        max_top_k: int,
        max_retrieve_k: int,
        max_nprobe: int = 1024,
        max_rerank_k: int = 2048,
    ) -> LocateOptions:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise InvalidOptionError(msg)

        check(1 <= self.top_k <= max_top_k, f"top_k must be between 1 and {max_top_k}")
        check(
            self.top_k <= self.retrieve_k <= max_retrieve_k,
            f"retrieve_k must be between top_k ({self.top_k}) and {max_retrieve_k}",
        )
        check(1 <= self.refine_beam <= 64, "refine_beam must be between 1 and 64")
        check(1 <= self.refine_width <= 8, "refine_width must be between 1 and 8")
        check(0 <= self.refine_levels <= 6, "refine_levels must be between 0 and 6")
        check(0 <= self.refine_start_res <= 8, "refine_start_res must be between 0 and 8")
        check(0 <= self.nms_km <= 5000 and math.isfinite(self.nms_km), "nms_km must be 0..5000")
        check(0 < self.region_share <= 1, "region_share must be in (0, 1]")
        check(0 <= self.region_res <= 8, "region_res must be between 0 and 8")
        check(0 <= self.neighbours <= 256, "neighbours must be between 0 and 256")
        check(
            0 <= self.nprobe <= max_nprobe,
            f"nprobe must be between 1 and {max_nprobe} (unset: the index's own)",
        )
        check(
            self.rerank_k is None or 0 <= self.rerank_k <= max_rerank_k,
            f"rerank_k must be between 0 (off) and {max_rerank_k}",
        )
        check(0 <= self.neighbour_weight <= 10, "neighbour_weight must be between 0 and 10")
        check(1 <= self.neighbour_kernel_km <= 5000, "neighbour_kernel_km must be 1..5000")
        check(0 <= self.neighbour_kernel_share <= 1, "neighbour_kernel_share must be 0..1")
        check(0 <= self.neighbour_temperature <= 1000, "neighbour_temperature must be 0..1000")
        check(0 <= self.structure_weight <= 10, "structure_weight must be between 0 and 10")
        check(0 <= self.colour_weight <= 10, "colour_weight must be between 0 and 10")
        check(0 <= self.colour_threshold < 1, "colour_threshold must be in [0, 1)")
        check(0 < self.near_copy_colour <= 1, "near_copy_colour must be in (0, 1]")
        check(0 <= self.near_copy_km <= 5000, "near_copy_km must be between 0 (off) and 5000")
        check(
            self.temperature is None or 0.01 <= self.temperature <= 100,
            "temperature must be between 0.01 and 100",
        )
        check(
            self.normalization in ("candidates", "gallery"),
            "normalization must be 'candidates' or 'gallery'",
        )
        for c in self.countries:
            check(len(c) == 2 and c.isalpha(), f"country '{c}' is not an ISO 3166 alpha-2 code")
        return self


def text_query(text: str, max_chars: int) -> str:
    """A text query, stripped; empty or longer than ``max_chars`` is an invalid option."""
    text = text.strip()
    if not text:
        raise InvalidOptionError("the text query is empty")
    if len(text) > max_chars:
        raise InvalidOptionError(
            f"the text query has {len(text)} characters; the limit is {max_chars} "
            "(GEOLOC_MAX_TEXT_CHARS)"
        )
    return text
