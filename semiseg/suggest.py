"""`semiseg suggest RUN --budget N`: the unlabeled images whose predictions are least stable, to annotate next.

Stability is ST++'s score (semiseg.ops.stability_score): the mIoU in [0, 1] between the predictions of a run's
snapshot exports (plain forward passes; a BST net predicts with BAFM) and its last snapshot, averaged over the
others. ST, ST++ and BST runs keep K teacher snapshots (1_teacher/snapshot_k.safetensors), and an ST++/BST-plus run
has already scored every image with them in 2_select/scores.json, which is reused. A run without snapshots compares
what it has, best.safetensors against last.safetensors, and says so. Written to --out (default RUN/suggest):
suggest.txt (id and score of the N least stable, least stable first), scores.json (every unlabeled image) and
suggest.html, a self-contained page showing each suggested image beside the reference export's colourised prediction.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semiseg import atomic
from semiseg.data.datasets import resolve_train_split
from semiseg.data.info import DatasetInfo
from semiseg.engine import checkpoint, dist
from semiseg.engine.evaluate import predict_whole
from semiseg.errors import CheckpointError
from semiseg.methods import METHODS
from semiseg.methods.selftrain import SCORES, SELECT, TEACHER, image_tensor, rank_least_stable, snapshot_predictions
from semiseg.ops import stability_score
from semiseg.predict import colorize

THUMB = 200
"""longest side of a thumbnail in pixels"""


def find_exports(run_dir: str | Path) -> tuple[list[Path], str]:
    """(exports compared, the reference last; a line saying which): the snapshots of the teacher stage, of the run
    root or of another stage folder (k ascending), else best.safetensors and last.safetensors of the root."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run folder not found")
    folders = [run_dir / TEACHER, run_dir, *sorted(p for p in run_dir.iterdir() if p.is_dir())]
    for folder in folders:
        found = {}
        for path in folder.glob("snapshot_*.safetensors"):
            match = re.fullmatch(r"snapshot_(\d+)\.safetensors", path.name)
            if match:
                found[int(match.group(1))] = path
        if len(found) >= 2:
            paths = [found[k] for k in sorted(found)]
            return paths, f"{len(paths)} snapshots in {folder} (the last, {paths[-1].name}, is the reference)"
    pair = [run_dir / "best.safetensors", run_dir / "last.safetensors"]
    if all(p.is_file() for p in pair):
        return pair, f"no snapshot exports in {run_dir}: best.safetensors compared with last.safetensors (reference)"
    raise CheckpointError(f"{run_dir}: no snapshot_k.safetensors exports and not both best/last.safetensors to compare")


def _plain(net, x: torch.Tensor) -> torch.Tensor:
    return predict_whole(net, x).argmax(1)


def _thumbnail(array: np.ndarray, resample: int) -> Image.Image:
    im = Image.fromarray(array)
    im.thumbnail((THUMB, THUMB), resample)
    return im


def _data_uri(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_html(
    path: Path,
    ranked: Sequence[tuple[str, float]],
    images: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    info: DatasetInfo,
    source: str = "",
) -> None:
    """A self-contained page: rank, id, stability, the image and its colourised prediction, inline PNGs."""
    rows = []
    for rank, ((image_id, score), image, pred) in enumerate(zip(ranked, images, preds), start=1):
        img = _data_uri(_thumbnail(image, Image.BILINEAR))
        mask = _data_uri(_thumbnail(colorize(pred, info.palette), Image.NEAREST))
        rows.append(
            f"<tr><td>{rank}</td><td>{html.escape(image_id)}</td><td>{score:.4f}</td>"
            f'<td><img src="{img}"></td><td><img src="{mask}"></td></tr>'
        )
    legend = "".join(
        f'<span style="background:rgb{tuple(c)};width:1em;display:inline-block">&nbsp;</span> {html.escape(n)} '
        for n, c in zip(info.classes, info.palette)
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>semiseg suggest</title><style>"
        "body{font-family:sans-serif}td{padding:4px;vertical-align:middle}img{display:block}</style></head><body>"
        f"<h1>{len(ranked)} least stable unlabeled images</h1>"
        f"<p>stability from {html.escape(source)}</p><p>{legend}</p>"
        "<table><tr><th>rank</th><th>id</th><th>stability</th><th>image</th><th>prediction</th></tr>"
        + "".join(rows)
        + "</table></body></html>\n"
    )
    atomic.write_text(path, page)


def suggest(
    run_dir: str | Path,
    budget: int,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    device: str = "",
) -> list[tuple[str, float]]:
    """Rank the run's unlabeled images by stability, least stable first; write the outputs; return the top `budget`."""
    run_dir = Path(run_dir)
    if budget < 1:
        raise CheckpointError(f"--budget {budget}: suggest at least one image")
    exports, source = find_exports(run_dir)
    cfg, reference, info = checkpoint.load_export(exports[-1], METHODS, overrides)
    dev = dist.init(device or cfg.train.device)
    unlabeled = resolve_train_split(cfg.data)[1]
    stored = run_dir / SELECT / SCORES
    if exports[0].parent == run_dir / TEACHER and stored.is_file():
        scores = json.loads(stored.read_text())
        ids = list(scores)
        source += f"; scores read from {stored}"
    else:
        nets = [checkpoint.load_export(p, METHODS, overrides)[1].to(dev) for p in exports]
        ids = unlabeled.ids
        scores = {
            sample.id: float(stability_score(preds, info.num_classes))
            for sample, preds in snapshot_predictions(nets, unlabeled, _plain, dev, range(len(unlabeled)))
        }
    ranked = rank_least_stable(ids, scores)
    top = ranked[:budget]
    out = Path(out) if out else run_dir / "suggest"
    header = f"# stability from {source}\n# id stability (mIoU in [0, 1] between snapshots; least stable first)\n"
    atomic.write_text(out / "suggest.txt", header + "".join(f"{i} {s:.6f}\n" for i, s in top))
    atomic.write_json(out / "scores.json", {"source": source, "scores": dict(ranked)})
    chosen = unlabeled.subset([i for i, _ in top])
    reference = reference.to(dev)
    images, preds = [], []
    for k in range(len(chosen)):
        sample = chosen[k]
        images.append(sample.image)
        preds.append(_plain(reference, image_tensor(sample, dev))[0].to(torch.uint8).cpu().numpy())
    write_html(out / "suggest.html", top, images, preds, info, source)
    print(f"stability from {source}")
    print(f"{len(top)} of {len(ranked)} unlabeled images suggested -> {out / 'suggest.txt'}, {out / 'suggest.html'}")
    return top
