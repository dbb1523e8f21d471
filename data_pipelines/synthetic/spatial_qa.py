"""Spatial questions about synthetic scenes, with answers computed exactly from the scene layout.

Task families (QAPair.task):
  distance       numeric  distance (m) between the centres of two objects
  depth          numeric  camera z (m) of an object's centre in one view
  closer         choice   which of two objects has the smaller centre depth in one view
  count          numeric  how many objects of a shape the room holds, asked about the one or two views
                          that together show every one of them (so two views determine the answer)
  direction      choice   where object B is relative to object A from a view: left / right
                          (camera x) or in front / behind (camera z), asked only when one axis dominates
  camera_motion  choice   from image 1 to image 2: moved forward / backward / left / right (camera-1
                          frame translation, one axis dominating) or turned left / right (yaw)
  marker_row     choice   which horizontal quarter of image 1 (top / upper middle / lower middle /
                          bottom, options in that order) holds the point marked X: answered only by
                          finding the marked pixel, the lookup every marked question needs (the tiny
                          model's curriculum: without it, it never learns to read a marked object)
  marker_lower   choice   which of two marked points of image 1 is lower in the image, X or Y (options
                          in that order; the rows differ by >= 0.1 H): the comparison of two lookups that
                          `closer` needs (a lower marked object is the closer one for 94 % of them)

Objects are named by colour and shape ("the red box"; each (colour, shape) is unique in a scene)
and marked with a point (QAPair.markers: scene view, u, v, label 'X'/'Y', never an option letter) on a
visible pixel.
Question text refers to images by their 1-based position in QAPair.views, which a sampler puts
first, in that order. Numeric answers are rounded to centimetres ("2.37"); choice answers are a
letter. An object counts as visible in a view when it covers at least `min_pixels` pixels.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from data_pipelines.scene import QAPair, Scene
from data_pipelines.synthetic.render import SHAPES, SPLIT_CODES, RenderConfig, RenderedScene, render_scene

TASKS = ("distance", "depth", "closer", "count", "direction", "camera_motion", "marker_row", "marker_lower")
_LETTERS = "ABCDEF"
_NUMERIC_SUFFIX = " Answer with a number in metres."


@dataclasses.dataclass(frozen=True)
class QAConfig:
    """Which questions to ask about each synthetic scene."""

    tasks: tuple[str, ...] = TASKS
    per_task: int = 1  # questions per task family and scene (fewer when a scene cannot support them)
    min_pixels: int = 12  # an object is visible in a view when it covers at least this many pixels
    min_gap: float = 0.3  # metres: the smallest depth/offset difference a choice question relies on
    # Choice families whose options keep the order the generator writes them in instead of a random one (as
    # benchmarks do): closer lists the object marked X first, direction and camera_motion their options as in
    # _DIRECTIONS / _MOVES / _TURNS, so a letter always means the same thing. marker_row is always in order.
    fixed_order: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = sorted((set(self.tasks) | set(self.fixed_order)) - set(TASKS))
        if unknown:
            raise ValueError(f"QAConfig.tasks: unknown tasks {unknown}; known tasks are {list(TASKS)}")


def camera_coords(c2w: np.ndarray, point) -> np.ndarray:
    """World point float[3] -> float64[3] in the camera frame of c2w float[4, 4] (OpenCV axes)."""
    c2w = np.asarray(c2w, dtype=np.float64)
    return c2w[:3, :3].T @ (np.asarray(point, dtype=np.float64) - c2w[:3, 3])


class _Context:
    """Per-scene facts shared by the task generators."""

    def __init__(self, rendered: RenderedScene, cfg: QAConfig, rng: np.random.Generator):
        self.scene, self.layout, self.cfg, self.rng = rendered.scene, rendered.layout, cfg, rng
        self.ids = rendered.object_ids
        n = len(self.layout.objects)
        # pixels[v, k]: how many pixels of view v show object k
        self.pixels = np.stack([np.bincount(ids.ravel() + 1, minlength=n + 1)[1:] for ids in self.ids])
        self.visible = self.pixels >= cfg.min_pixels

    def name(self, k: int) -> str:
        return "the " + self.layout.objects[k].name

    def depth_of(self, k: int, view: int) -> float:
        return float(camera_coords(self.scene.c2w[view], self.layout.objects[k].center)[2])

    def marker(self, k: int, view: int, label: str) -> tuple[int, float, float, str]:
        """The pixel of object k in `view` nearest to its mask centroid, as (view, u, v, label)."""
        rows, cols = np.nonzero(self.ids[view] == k)
        nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
        return (view, float(cols[nearest]), float(rows[nearest]), label)

    def pairs_in_one_view(self):
        """Shuffled (view, a, b) with both objects visible in the view."""
        out = [(v, a, b) for v in range(len(self.ids))
               for a, b in itertools.permutations(np.flatnonzero(self.visible[v]).tolist(), 2)]
        return [out[i] for i in self.rng.permutation(len(out))]

    def choice(self, task, question, options, correct, views, markers, shuffle: bool | None = None) -> QAPair:
        """A choice question; options shuffled unless `task` is in `QAConfig.fixed_order` or `shuffle` says."""
        shuffle = task not in self.cfg.fixed_order if shuffle is None else shuffle
        order = self.rng.permutation(len(options)) if shuffle else np.arange(len(options))
        choices = tuple(f"{_LETTERS[i]}. {options[j]}" for i, j in enumerate(order))
        text = question + "\n" + "\n".join(choices) + "\nAnswer with the option's letter."
        return QAPair(text, _LETTERS[int(np.flatnonzero(order == correct)[0])], "choice", task, choices,
                      tuple(views), tuple(markers))


def _distance(ctx: _Context) -> QAPair | None:
    seen = np.flatnonzero(ctx.visible.any(axis=0))
    if len(seen) < 2:
        return None
    a, b = ctx.rng.choice(seen, 2, replace=False).tolist()
    va, vb = int(np.argmax(ctx.pixels[:, a])), int(np.argmax(ctx.pixels[:, b]))
    both = np.flatnonzero(ctx.visible[:, a] & ctx.visible[:, b])
    if both.size:  # one image shows both objects
        va = vb = int(both[np.argmax(np.minimum(ctx.pixels[both, a], ctx.pixels[both, b]))])
    views = (va,) if va == vb else (va, vb)
    dist = np.linalg.norm(np.subtract(ctx.layout.objects[a].center, ctx.layout.objects[b].center))
    q = (f"What is the distance between the centres of {ctx.name(a)} (marked X) and {ctx.name(b)} (marked Y)?"
         + _NUMERIC_SUFFIX)
    return QAPair(q, f"{dist:.2f}", "numeric", "distance", (), views,
                  (ctx.marker(a, va, "X"), ctx.marker(b, vb, "Y")))


def _depth(ctx: _Context) -> QAPair | None:
    options = np.argwhere(ctx.visible)
    if len(options) == 0:
        return None
    v, k = options[ctx.rng.integers(len(options))].tolist()
    q = (f"In image 1, how far is the centre of {ctx.name(k)} (marked X) from the camera, measured along the "
         "viewing direction?" + _NUMERIC_SUFFIX)
    return QAPair(q, f"{ctx.depth_of(k, v):.2f}", "numeric", "depth", (), (v,), (ctx.marker(k, v, "X"),))


def _closer(ctx: _Context) -> QAPair | None:
    for v, a, b in ctx.pairs_in_one_view():
        da, db = ctx.depth_of(a, v), ctx.depth_of(b, v)
        if abs(da - db) >= ctx.cfg.min_gap:
            q = (f"In image 1, which object is closer to the camera: {ctx.name(a)} (marked X) or "
                 f"{ctx.name(b)} (marked Y)?")
            return ctx.choice("closer", q, [ctx.name(a), ctx.name(b)], 0 if da < db else 1, (v,),
                              (ctx.marker(a, v, "X"), ctx.marker(b, v, "Y")))
    return None


def _covering_views(ctx: _Context, members: list[int]) -> tuple[int, ...] | None:
    """The fewest views (one or two) that together show every object in `members`, most pixels of them first;
    None when no two views do. Deterministic (no random draw), so the families after it ask what they did."""
    n = len(ctx.ids)
    for size in (1, 2):
        covers = [vs for vs in itertools.combinations(range(n), size) if ctx.visible[list(vs)][:, members].any(0).all()]
        if covers:
            return max(covers, key=lambda vs: int(ctx.pixels[list(vs)][:, members].sum()))
    return None


def _count(ctx: _Context) -> QAPair | None:
    # Asked about the one or two views that show every object of the shape, which a sampler puts first: a
    # model shown two views of the six must be able to see every object it counts.
    covering = {s: _covering_views(ctx, [k for k, o in enumerate(ctx.layout.objects) if o.shape == s])
                for s in SHAPES if any(o.shape == s for o in ctx.layout.objects)}
    shapes = [s for s in SHAPES if covering.get(s) is not None]
    if not shapes:
        return None
    shape = shapes[ctx.rng.integers(len(shapes))]
    count = sum(o.shape == shape for o in ctx.layout.objects)
    plural = {"box": "boxes", "sphere": "spheres", "cylinder": "cylinders"}[shape]
    q = f"How many {plural} are there in the room shown in these images? Answer with a number."
    return QAPair(q, str(count), "numeric", "count", (), covering[shape], ())


_DIRECTIONS = ("to the left of", "to the right of", "in front of (closer to the camera than)",
               "behind (farther from the camera than)")


def _one_axis_dominates(dx: float, dz: float, min_gap: float) -> bool:
    """Whether one of two offsets is at least twice the other and at least min_gap: the clear cases asked."""
    return max(abs(dx), abs(dz)) >= max(2 * min(abs(dx), abs(dz)), min_gap)


def _direction_option(offset) -> int:
    """Index in _DIRECTIONS of a camera-frame offset float[3] from X's object to Y's: the dominant axis of
    camera x (left / right) and z (in front / behind)."""
    dx, dz = offset[0], offset[2]
    if abs(dx) >= abs(dz):
        return 0 if dx < 0 else 1
    return 2 if dz < 0 else 3


def _direction(ctx: _Context) -> QAPair | None:
    for v, a, b in ctx.pairs_in_one_view():
        pa = camera_coords(ctx.scene.c2w[v], ctx.layout.objects[a].center)
        pb = camera_coords(ctx.scene.c2w[v], ctx.layout.objects[b].center)
        dx, dz = pb[0] - pa[0], pb[2] - pa[2]
        if not _one_axis_dominates(dx, dz, ctx.cfg.min_gap):
            continue
        correct = _direction_option(pb - pa)
        q = (f"In image 1, from the camera's viewpoint, where is {ctx.name(b)} (marked Y) relative to "
             f"{ctx.name(a)} (marked X)?")
        return ctx.choice("direction", q, [f"{d} {ctx.name(a)}" for d in _DIRECTIONS], correct, (v,),
                          (ctx.marker(a, v, "X"), ctx.marker(b, v, "Y")))
    return None


_MOVES = ("moved forward", "moved backward", "moved left", "moved right")
_TURNS = ("turned left", "turned right")


def _move_option(move) -> int:
    """Index in _MOVES of camera 2's centre float[3] in camera 1's frame: the dominant of z and x."""
    dx, dz = move[0], move[2]
    if abs(dz) >= abs(dx):
        return 0 if dz > 0 else 1
    return 2 if dx < 0 else 3


def _turn_option(yaw: float) -> int:
    """Index in _TURNS of a yaw (radians, positive = turned right)."""
    return 1 if yaw > 0 else 0


def relative_motion(c2w_i: np.ndarray, c2w_j: np.ndarray) -> tuple[np.ndarray, float]:
    """(translation float64[3] of camera j's centre in camera i's frame, yaw in radians of j's viewing
    direction relative to i's about i's vertical axis; positive = turned right)."""
    c2w_i, c2w_j = np.asarray(c2w_i, np.float64), np.asarray(c2w_j, np.float64)
    move = c2w_i[:3, :3].T @ (c2w_j[:3, 3] - c2w_i[:3, 3])
    forward = c2w_i[:3, :3].T @ c2w_j[:3, 2]
    return move, float(np.arctan2(forward[0], forward[2]))


def _camera_motion(ctx: _Context) -> QAPair | None:
    n = ctx.scene.num_views
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    for idx in ctx.rng.permutation(len(pairs)):
        i, j = pairs[idx]
        move, yaw = relative_motion(ctx.scene.c2w[i], ctx.scene.c2w[j])
        dx, dz = move[0], move[2]
        candidates = []
        if _one_axis_dominates(dx, dz, ctx.cfg.min_gap):
            candidates.append((list(_MOVES), _move_option(move)))
        if abs(yaw) >= np.radians(15):
            candidates.append((list(_TURNS), _turn_option(yaw)))
        if candidates:
            options, correct = candidates[ctx.rng.integers(len(candidates))]
            kind = "move" if len(options) == 4 else "turn"
            q = f"How did the camera {kind} from image 1 to image 2 (relative to where it faced in image 1)?"
            return ctx.choice("camera_motion", q, options, correct, (i, j), ())
    return None


_BANDS = ("top", "upper middle", "lower middle", "bottom")
# Training crops scale a frame about its centre by up to 1/0.9 (sampling.sample_views), which moves a
# point at the quarter lines (0.25 H from the centre) by up to 0.028 H: markers nearer a quarter line
# than this could change band in the geometry frames, so they are not asked about.
_BAND_MARGIN = 0.03


def _marker_row(ctx: _Context) -> QAPair | None:
    options = np.argwhere(ctx.visible)
    for idx in ctx.rng.permutation(len(options)):
        v, k = options[idx].tolist()
        marker = ctx.marker(k, v, "X")
        row = (marker[2] + 0.5) / ctx.ids[v].shape[0]  # pixel centre, as a fraction of the height
        if min(abs(row - 0.25), abs(row - 0.75)) < _BAND_MARGIN:
            continue
        q = "In image 1, in which horizontal band of the image is the point marked X?"
        return ctx.choice("marker_row", q, list(_BANDS), min(3, int(4 * row)), (v,), (marker,), shuffle=False)
    return None


def _marker_lower(ctx: _Context) -> QAPair | None:
    for v, a, b in ctx.pairs_in_one_view():
        ma, mb = ctx.marker(a, v, "X"), ctx.marker(b, v, "Y")
        if abs(ma[2] - mb[2]) >= 0.1 * ctx.ids[v].shape[0]:
            q = "In image 1, which marked point is lower in the image?"
            return ctx.choice("marker_lower", q, ["the point marked X", "the point marked Y"],
                              0 if ma[2] > mb[2] else 1, (v,), (ma, mb), shuffle=False)
    return None


_GENERATORS = {"distance": _distance, "depth": _depth, "closer": _closer, "count": _count,
               "direction": _direction, "camera_motion": _camera_motion, "marker_row": _marker_row,
               "marker_lower": _marker_lower}


# --------------------------------------------------------------------------------------------------
# The same rules on another geometry (a model's reconstruction)
# --------------------------------------------------------------------------------------------------
# Families whose answer follows from where the marked points and the cameras are; count needs objects told
# apart, and marker_row / marker_lower are answered by the marked pixels alone (no geometry).
GEOMETRY_TASKS = ("distance", "depth", "closer", "direction", "camera_motion")
LENGTH_TASKS = ("distance", "depth")  # of those, the ones answered in metres (`length_from_geometry`)


def _letter(qa: QAPair, option: str) -> str:
    """The letter of the choice of `qa` whose text starts with `option`."""
    for choice in qa.choices:
        if choice[3:].startswith(option):
            return choice[0]
    raise ValueError(f"{qa.task}: no choice of {qa.choices} starts with {option!r}")


def length_from_geometry(qa: QAPair, marked: dict[str, np.ndarray]) -> float | None:
    """The length a depth or distance question asks for, measured between the marked points `marked`
    ({label: float[3]} in image 1's camera frame, in that geometry's unit); None for other families."""
    if qa.task == "depth":
        return float(marked["X"][2])
    if qa.task == "distance":
        return float(np.linalg.norm(marked["X"] - marked["Y"]))
    return None


def answer_from_geometry(qa: QAPair, marked: dict[str, np.ndarray], motion: tuple[np.ndarray, float] | None,
                         scale: float = 1.0) -> str | None:
    """The answer this module's rules give to `qa` when the scene's geometry is replaced by another one.

    marked: {label: float[3]}, each marked point in the camera frame of image 1 (e.g. a model's point map
    read at the marker pixels); motion: (centre float[3], yaw) of camera 2 in camera 1's frame, as
    `relative_motion` gives it (None with one image); scale: metres per unit of that geometry (lengths are
    multiplied by it). Where the generator measures objects' centres, this measures the marked points, which lie
    on the objects' surfaces, and it picks the dominant axis where the generator asked only clear cases.
    None for the families outside GEOMETRY_TASKS.
    """
    length = length_from_geometry(qa, marked)
    if length is not None:
        return f"{scale * length:.2f}"
    if qa.task == "closer":  # the options are the two objects' names; the question names X's "... (marked X)"
        x, y = sorted(qa.choices, key=lambda c: f"{c[3:]} (marked X)" not in qa.question)
        return (x if marked["X"][2] < marked["Y"][2] else y)[0]
    if qa.task == "direction":
        return _letter(qa, _DIRECTIONS[_direction_option(marked["Y"] - marked["X"])])
    if qa.task == "camera_motion":
        move, yaw = motion
        turn = any(c[3:] in _TURNS for c in qa.choices)
        return _letter(qa, _TURNS[_turn_option(yaw)] if turn else _MOVES[_move_option(move)])
    return None


def make_spatial_qa(rendered: RenderedScene, cfg: QAConfig, rng: np.random.Generator) -> tuple[QAPair, ...]:
    """Up to cfg.per_task questions per task family (duplicates removed) about a rendered scene."""
    ctx = _Context(rendered, cfg, rng)
    out: list[QAPair] = []
    for task in cfg.tasks:
        for _ in range(cfg.per_task):
            qa = _GENERATORS[task](ctx)
            if qa is not None and qa not in out:
                out.append(qa)
    return tuple(out)


def synthetic_qa_scene(split: str, index: int, render_cfg: RenderConfig = RenderConfig(),
                       qa_cfg: QAConfig = QAConfig()) -> RenderedScene:
    """Scene (split, index) of `render_scene` with its spatial QA attached (dataset 'synthetic_qa').
    The questions draw from their own random stream, so the pixels equal `render_scene`'s."""
    rendered = render_scene(split, index, render_cfg)
    rng = np.random.default_rng([render_cfg.seed, SPLIT_CODES[split], index, 1])
    qa = make_spatial_qa(rendered, qa_cfg, rng)
    scene: Scene = dataclasses.replace(rendered.scene, dataset="synthetic_qa", qa=qa)
    return dataclasses.replace(rendered, scene=scene)
