"""Synthetic chest-radiograph benchmark: what a teaching lab can run without credentials.

Every case gets ground-truth attributes (focal opacity in one of six zones, pleural effusion,
cardiomegaly, pneumothorax, 0-3 nodules, a support device, plus described-but-invisible nuisance
attributes), a grayscale chest-film-like rendering of them and a free-text report written from
them (varied phrasing, order, synonyms and negations): a report = a header (view, comparison:
the examination and comparison lines, not visible in the image) + the findings proper, and an
impression. From the cases it writes one task folder per PTUnifier task (paper 5.2, Table 2) in
the manifest format of data.py:

  pretrain  image + [report, impression]                   (MIMIC-CXR-like pre-training pairs)
  ic        image -> 6 multi-label findings                  (CheXpert-like, macro AUROC)
  tc        premise/hypothesis -> entailment/contradiction/neutral  (RadNLI-like, accuracy)
  ts        report -> impression                             (MIMIC-CXR summarisation, ROUGE-L)
  retrieval image <-> report                                 (ROCO-like, R@1/5/10)
  itg       image -> findings, without the header            (report generation; as R2Gen's
                                                              MIMIC-CXR findings section)
  vqa       image + question -> answer, closed and open      (VQA-RAD/SLAKE-like)

"left"/"right" always mean the patient's side, which is the image's right/left (radiographic
convention). Splits are by case, so no image or report is shared between train, val and test.
The same --seed gives the same bytes. Run:
  python synth.py --out data/synth             # ~4,300 cases, < 1 minute on 2 cores
  python synth.py --out data/synth --preview   # also writes data/synth/preview.png
"""
import argparse
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import data
import metrics
from tokenizer import Tokenizer

SIDES = ("right", "left")                       # patient's side; right is on the image's left
LEVELS = ("upper", "middle", "lower")
ZONES = tuple(f"{s} {l}" for s in SIDES for l in LEVELS)
SIZES = ("small", "moderate", "large")
DEVICES = ("endotracheal tube", "right internal jugular catheter", "nasogastric tube",
           "left-sided pacemaker", "left PICC line")
IC_CLASSES = ["opacity", "effusion", "cardiomegaly", "pneumothorax", "nodule", "device"]
VERSION = 2  # summary.json "version"; 2: the itg target is the findings without the header
TC_CLASSES = ["entailment", "contradiction", "neutral"]
NUMBER_WORDS = ("no", "one", "two", "three")


@dataclass
class Case:
    """Ground truth of one synthetic study. None / 0 / False mean absent."""
    opacity: str | None          # zone from ZONES
    opacity_size: str            # SIZES; drives the rendered radius
    opacity_desc: str            # described only: patchy, hazy, ...
    effusion: str | None         # "right" | "left" | "both"
    effusion_size: str
    cardiomegaly: bool
    cardio_grade: str            # described only: mild, moderate, marked
    pneumothorax: str | None     # "right" | "left"
    ptx_size: str
    nodules: int                 # 0-3
    nodule_mm: list              # described sizes in mm, one per nodule
    device: str | None           # from DEVICES
    view: str                    # nuisance: PA / AP / portable
    comparison: str              # nuisance: comparison phrase
    volumes: str                 # nuisance: low / normal / hyperinflated
    bones: str                   # nuisance: osseous remark


def cap(text: str) -> str:
    """Upper-case the first letter only (str.capitalize would lower-case 'PICC', 'CT')."""
    return text[:1].upper() + text[1:]


def pick(rng, seq):
    """One element of `seq`, drawn with numpy `rng` (keeps python types)."""
    return seq[int(rng.integers(len(seq)))]


def sample_case(rng) -> Case:
    """Draw attributes with priors that keep every class present and none trivial."""
    months = ("January", "February", "March", "April", "May", "June", "July", "August",
              "September", "October", "November", "December")
    comparison = pick(rng, (
        "", "No prior studies are available for comparison.",
        f"Comparison is made to the prior radiograph from {pick(rng, months)} {rng.integers(1, 29)}.",
        f"Compared with the study of {rng.integers(2, 30)} days earlier.",
        f"Comparison: chest radiograph from {pick(rng, months)} {rng.integers(1, 29)}, 20{rng.integers(10, 24)}.",
        f"Prior exam from {rng.integers(2, 12)} months ago is reviewed."))
    nodules = int(rng.choice(4, p=(0.55, 0.2, 0.15, 0.1)))
    return Case(
        opacity=pick(rng, ZONES) if rng.random() < 0.45 else None,
        opacity_size=pick(rng, SIZES), opacity_desc=pick(rng, (
            "patchy", "hazy", "ill-defined", "confluent", "streaky", "rounded", "dense")),
        effusion=pick(rng, ("right", "left", "both")) if rng.random() < 0.4 else None,
        effusion_size=pick(rng, SIZES),
        cardiomegaly=bool(rng.random() < 0.3), cardio_grade=pick(rng, ("mild", "moderate", "marked")),
        pneumothorax=pick(rng, SIDES) if rng.random() < 0.2 else None, ptx_size=pick(rng, SIZES),
        nodules=nodules, nodule_mm=sorted(int(rng.integers(4, 19)) for _ in range(nodules)),
        device=pick(rng, DEVICES) if rng.random() < 0.35 else None,
        view=pick(rng, ("PA", "AP", "portable AP", "upright PA", "semi-upright AP")),
        comparison=comparison, volumes=pick(rng, ("normal", "normal", "low", "hyperinflated")),
        bones=pick(rng, ("", "", "degenerative", "old rib fracture", "intact", "scoliosis")))


# ----------------------------------------------------------------------------- rendering

def _soft(d, edge):
    """1 inside (d < 1), 0 outside, linear ramp of width `edge` across the boundary d = 1."""
    return np.clip((1.0 - d) / edge + 0.5, 0.0, 1.0)


def _ellipse(x, y, cx, cy, rx, ry):
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2


def _polyline(x, y, points, width):
    """Soft mask of a polyline of the given half-`width` (distance field to segments)."""
    dist = np.full(x.shape, np.inf)
    for (px, py), (qx, qy) in zip(points[:-1], points[1:]):
        dx, dy = qx - px, qy - py
        t = np.clip(((x - px) * dx + (y - py) * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.minimum(dist, np.hypot(x - px - t * dx, y - py - t * dy))
    return np.clip(1.5 - dist / width, 0, 1)


DEVICE_PATHS = {  # image coordinates, x to the image's right (= patient's left), y down
    "endotracheal tube": [(0.0, -1.1), (0.0, -0.75), (0.01, -0.35)],
    "right internal jugular catheter": [(-0.35, -1.1), (-0.2, -0.75), (-0.07, -0.45), (-0.05, -0.12)],
    "nasogastric tube": [(0.02, -1.1), (0.0, -0.3), (0.04, 0.45), (0.3, 0.62), (0.45, 0.58)],
    "left-sided pacemaker": [(0.55, -0.62), (0.3, -0.55), (0.05, -0.3), (0.02, 0.05), (0.15, 0.35)],
    "left PICC line": [(1.1, -0.45), (0.6, -0.62), (0.2, -0.55), (0.0, -0.4), (-0.04, -0.15)],
}


def render(case: Case, size: int, rng) -> np.ndarray:
    """Draw `case` as a uint8 [size, size] chest-film-like image (bright = dense).

    Random anatomy (thorax width, lung size, heart and diaphragm position), rotation (+-6 deg),
    scale/shift, contrast (gamma), brightness and noise keep pixels from identifying a case.
    """
    u = (np.arange(size) + 0.5) / size * 2 - 1
    u, v = np.meshgrid(u, u)                                    # (S, S) image coordinates
    angle = np.deg2rad(rng.uniform(-6, 6))
    scale = rng.uniform(0.92, 1.08)
    x = (np.cos(angle) * u + np.sin(angle) * v) / scale - rng.uniform(-0.05, 0.05)
    y = (-np.sin(angle) * u + np.cos(angle) * v) / scale - rng.uniform(-0.05, 0.05)

    body_w, lung_w = rng.uniform(0.8, 0.95), rng.uniform(0.9, 1.08)
    dome = rng.uniform(0.3, 0.42)
    img = 0.08 + 0.45 * _soft(_ellipse(x, y, 0, 0.08, body_w, 1.1), 0.08)
    img += 0.12 * _soft(np.abs(x) / 0.065, 0.3) * (y > -0.9)                # spine
    lungs, sides = np.zeros_like(x), {}
    for name, sign in (("right", -1), ("left", 1)):
        cx, rx = sign * 0.36 * lung_w, 0.28 * lung_w
        floor = dome - (0.04 if name == "right" else 0) + 0.3 * ((x - cx) / rx) ** 2
        mask = _soft(_ellipse(x, y, cx, -0.08, rx, 0.66), 0.12) * np.clip((floor - y) / 0.04, 0, 1)
        sides[name] = (mask, cx, rx, floor)
        lungs = np.maximum(lungs, mask)
    heart_rx = (rng.uniform(0.4, 0.46) if case.cardiomegaly else rng.uniform(0.26, 0.31)) * lung_w
    heart = _soft(_ellipse(x, y, 0.1 * lung_w, dome - 0.1, heart_rx, rng.uniform(0.2, 0.25)), 0.15)
    hilum = np.arctan2(y + 0.1, np.abs(x) - 0.12)
    markings = 0.05 * (0.5 + 0.5 * np.sin(15 * hilum + rng.uniform(0, 6.3))) * np.exp(
        -np.hypot(np.abs(x) - 0.12, y + 0.1) / 0.45)
    ptx = _pneumothorax_mask(case, sides, x, y) if case.pneumothorax else np.zeros_like(x)
    img -= 0.34 * lungs * (1 - 0.75 * heart) + 0.1 * ptx
    img += markings * lungs * (1 - ptx)
    rib_phase = (y + 0.3 * np.abs(x) ** 1.5 + rng.uniform(0, 1)) / rng.uniform(0.15, 0.18)
    img += 0.07 * (np.mod(rib_phase, 1.0) < 0.35) * _soft(_ellipse(x, y, 0, -0.1, body_w, 0.72), 0.1)
    for sign in (-1, 1):                                                    # clavicles
        img += 0.15 * _polyline(x, y, [(sign * 0.08, -0.62), (sign * 0.62, -0.74)], 0.025)
    img += _findings(case, sides, x, y, rng)
    gamma = rng.uniform(0.8, 1.25)
    img = np.clip(img * rng.uniform(0.9, 1.15) + rng.uniform(-0.05, 0.05), 0, 1) ** gamma
    img += rng.normal(0, 0.025, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _pneumothorax_mask(case, sides, x, y):
    """Lateral crescent of the lung (no markings, darker) for a pneumothorax."""
    mask, cx, rx, _ = sides[case.pneumothorax]
    sign = -1 if case.pneumothorax == "right" else 1
    frac = {"small": 0.28, "moderate": 0.4, "large": 0.55}[case.ptx_size]
    return mask * np.clip((sign * (x - cx) / rx - (1 - 2 * frac)) / 0.05, 0, 1)


def _findings(case: Case, sides, x, y, rng) -> np.ndarray:
    """Additive density of opacity, effusion, nodules, pneumothorax edge and device."""
    add = np.zeros_like(x)
    if case.opacity:
        side, level = case.opacity.split()
        mask, cx, rx, _ = sides[side]
        cy = {"upper": -0.45, "middle": -0.12, "lower": 0.18}[level] + rng.uniform(-0.05, 0.05)
        r = {"small": 0.13, "moderate": 0.17, "large": 0.22}[case.opacity_size]
        ox, oy = cx + rng.uniform(-0.06, 0.06), cy
        blob = np.exp(-_ellipse(x, y, ox, oy, r * rng.uniform(0.8, 1.25), r) * 1.5)
        add += 0.32 * blob * np.clip(mask * 1.5, 0, 1)
    for side in ({"both": SIDES}.get(case.effusion, (case.effusion,)) if case.effusion else ()):
        mask, cx, rx, floor = sides[side]
        sign = -1 if side == "right" else 1
        height = {"small": 0.14, "moderate": 0.26, "large": 0.4}[case.effusion_size]
        meniscus = floor - height - 0.18 * np.clip(sign * (x - cx) / rx, -1, 1)  # higher laterally
        add += 0.3 * mask * np.clip((y - meniscus) / 0.05, 0, 1)
    if case.pneumothorax:
        mask, cx, rx, _ = sides[case.pneumothorax]
        sign = -1 if case.pneumothorax == "right" else 1
        frac = {"small": 0.28, "moderate": 0.4, "large": 0.55}[case.ptx_size]
        line = np.exp(-((sign * (x - cx) / rx - (1 - 2 * frac)) / 0.03) ** 2)
        add += 0.2 * line * mask
    placed = []
    while len(placed) < case.nodules:
        side = pick(rng, SIDES)
        _, cx, rx, _ = sides[side]
        nx, ny = cx + rng.uniform(-0.65, 0.65) * rx, rng.uniform(-0.55, 0.12)
        if all(np.hypot(nx - px, ny - py) > 0.22 for px, py in placed):
            placed.append((nx, ny))
    for nx, ny in placed:
        add += 0.42 * _soft(np.hypot(x - nx, y - ny) / rng.uniform(0.045, 0.06), 0.4)
    if case.device:
        jitter = rng.uniform(-0.03, 0.03, (len(DEVICE_PATHS[case.device]), 2))
        points = [(px + jx, py + jy) for (px, py), (jx, jy) in zip(DEVICE_PATHS[case.device], jitter)]
        add += 0.6 * _polyline(x, y, points, 0.018)
        if case.device == "left-sided pacemaker":
            add += 0.6 * _soft(np.maximum(np.abs(x - points[0][0]) / 0.1, np.abs(y - points[0][1]) / 0.065), 0.1)
    return add


# ----------------------------------------------------------------------------- reports

def _zone_phrase(zone: str, rng) -> str:
    side, level = zone.split()
    if side == "left" and level == "middle" and rng.random() < 0.4:
        return "lingula"
    return pick(rng, (f"{side} {level} lobe" if level != "middle" or side == "right"
                      else f"{side} mid lung", f"{side} {level} lung zone",
                      f"{side} {'mid' if level == 'middle' else level} lung",
                      f"{level} zone of the {side} lung"))


def _lung_sentences(c: Case, rng) -> list[tuple[str, set]]:
    out = []
    if c.opacity:
        place, desc = _zone_phrase(c.opacity, rng), c.opacity_desc
        out.append((pick(rng, (
            f"There is a {c.opacity_size} {desc} opacity in the {place}.",
            f"{cap(c.opacity_size)} {desc} airspace opacity is seen in the {place}.",
            f"A {desc} {c.opacity_size} area of consolidation projects over the {place}.",
            f"{cap(desc)} opacification of the {place}, {c.opacity_size} in extent.",
            f"New {desc} opacity in the {place}, {c.opacity_size} in size.")), {"opacity"}))
    elif c.nodules == 0 and rng.random() < 0.5:
        out.append((pick(rng, ("The lungs are clear.", "Lungs are clear bilaterally.",
                               "Both lungs are clear without focal consolidation.")),
                    {"opacity", "nodule"}))
        return out
    else:
        out.append((pick(rng, ("No focal consolidation.", "There is no focal airspace opacity.",
                               "No focal opacity is identified.",
                               "No consolidation is seen.")), {"opacity"}))
    out.append((_nodule_sentence(c, rng), {"nodule"}))
    return out


def _nodule_sentence(c: Case, rng) -> str:
    if c.nodules == 0:
        return pick(rng, ("No pulmonary nodules are seen.", "No nodules or masses.",
                          "There is no suspicious pulmonary nodule.",
                          "No discrete nodule is identified."))
    sizes = ", ".join(f"{mm}" for mm in c.nodule_mm) + " mm"
    if c.nodules == 1:
        return pick(rng, (f"A {c.nodule_mm[0]} mm pulmonary nodule is noted.",
                          f"There is a solitary {c.nodule_mm[0]} mm nodule.",
                          f"Single nodular opacity measuring {c.nodule_mm[0]} mm."))
    n = NUMBER_WORDS[c.nodules]
    return pick(rng, (f"There are {n} pulmonary nodules measuring {sizes}.",
                      f"{cap(n)} nodules are seen, measuring {sizes}.",
                      f"Multiple ({n}) nodular opacities up to {c.nodule_mm[-1]} mm.",
                      f"{cap(n)} scattered pulmonary nodules, the largest {c.nodule_mm[-1]} mm."))


def _pleural_sentences(c: Case, rng) -> list[tuple[str, set]]:
    if not c.effusion and not c.pneumothorax:
        return [(pick(rng, ("No pleural effusion or pneumothorax.",
                            "There is no pleural effusion or pneumothorax.",
                            "No pneumothorax or pleural effusion is seen.",
                            "No effusion or pneumothorax.",
                            "The costophrenic angles are sharp and there is no pneumothorax.")),
                 {"effusion", "pneumothorax"})]
    out = []
    if c.effusion == "both":
        out.append((pick(rng, (f"There are {c.effusion_size} bilateral pleural effusions.",
                               f"{cap(c.effusion_size)} bilateral effusions are present.",
                               f"Bilateral {c.effusion_size} pleural effusions blunt both costophrenic angles.")),
                    {"effusion"}))
    elif c.effusion:
        out.append((pick(rng, (f"There is a {c.effusion_size} {c.effusion} pleural effusion.",
                               f"{cap(c.effusion_size)} {c.effusion}-sided pleural effusion.",
                               f"A {c.effusion_size} {c.effusion} effusion blunts the costophrenic angle.",
                               f"Blunting of the {c.effusion} costophrenic angle from a {c.effusion_size} effusion.")),
                    {"effusion"}))
    else:
        out.append((pick(rng, ("No pleural effusion.", "There is no pleural effusion.",
                               "The costophrenic angles are sharp.")), {"effusion"}))
    if c.pneumothorax:
        out.append((pick(rng, (f"There is a {c.ptx_size} {c.pneumothorax} pneumothorax.",
                               f"{cap(c.ptx_size)} {c.pneumothorax}-sided pneumothorax is present.",
                               f"A {c.ptx_size} {c.pneumothorax} apical pneumothorax is seen.",
                               f"{cap(c.pneumothorax)} pneumothorax, {c.ptx_size} in size.")),
                    {"pneumothorax"}))
    else:
        out.append((pick(rng, ("No pneumothorax.", "There is no pneumothorax.",
                               "No pneumothorax is seen.")), {"pneumothorax"}))
    return out


def _heart_sentence(c: Case, rng) -> tuple[str, set]:
    if c.cardiomegaly:
        adverb = {"mild": "mildly", "moderate": "moderately", "marked": "markedly"}[c.cardio_grade]
        text = pick(rng, (f"The heart is {adverb} enlarged.", f"There is {c.cardio_grade} cardiomegaly.",
                          f"The cardiac silhouette is {adverb} enlarged.",
                          f"{cap(c.cardio_grade)} enlargement of the cardiac silhouette."))
    else:
        text = pick(rng, ("Heart size is normal.", "The cardiac silhouette is within normal limits.",
                          "The heart is not enlarged.", "Normal heart size.",
                          "Cardiac size is normal."))
    if rng.random() < 0.5:
        text += " " + pick(rng, ("Mediastinal and hilar contours are unremarkable.",
                                 "The mediastinal contours are normal.",
                                 "Hilar contours are within normal limits."))
    return text, {"cardiomegaly"}


def _device_sentence(c: Case, rng) -> tuple[str, set] | None:
    if not c.device:
        if rng.random() < 0.5:
            return None
        return pick(rng, ("No lines or tubes.", "There are no support devices.",
                          "No indwelling lines or tubes are seen.")), {"device"}
    position = pick(rng, ("in standard position", "in appropriate position", "in good position",
                          "unchanged in position", "with its tip in expected position"))
    return pick(rng, (f"A {c.device} is present, {position}.", f"{cap(c.device)} {position}.",
                      f"There is a {c.device} {position}.")), {"device"}


def _nuisance_sentences(c: Case, rng) -> tuple[list[str], list[str]]:
    """(sentences placed first: view, comparison; sentences placed last: volumes, bones)."""
    first = [cap(pick(rng, (f"{c.view} view of the chest.", f"Single {c.view} radiograph of the chest.",
                        f"{c.view} chest radiograph was obtained.")))]
    if c.comparison:
        first.append(c.comparison)
    last = []
    if c.volumes != "normal" or rng.random() < 0.4:
        last.append({"normal": pick(rng, ("Lung volumes are normal.", "The lungs are well expanded.")),
                     "low": pick(rng, ("Lung volumes are low.", "Low lung volumes.")),
                     "hyperinflated": pick(rng, ("The lungs are hyperinflated.",
                                                 "Hyperexpanded lungs."))}[c.volumes])
    bones = {"degenerative": "Degenerative changes of the thoracic spine.",
             "old rib fracture": "Healed fracture of a left rib.",
             "intact": "No acute osseous abnormality.", "scoliosis": "Mild thoracic scoliosis."}
    if c.bones:
        last.append(bones[c.bones])
    return first, last


def write_findings(c: Case, rng) -> tuple[str, str, list[tuple[str, set]]]:
    """(header, findings, tagged): the examination/comparison lines, the findings proper (the
    attribute sentences in random group order, then volumes and bones) and its attribute-bearing
    sentences [(sentence, attributes covered)]. The report text is header + " " + findings."""
    groups = [_lung_sentences(c, rng), _pleural_sentences(c, rng), [_heart_sentence(c, rng)]]
    device = _device_sentence(c, rng)
    if device:
        groups.append([device])
    order = rng.permutation(len(groups))
    tagged = [s for g in order for s in groups[g]]
    first, last = _nuisance_sentences(c, rng)
    return " ".join(first), " ".join([s for s, _ in tagged] + last), tagged


def write_impression(c: Case, rng) -> str:
    """Short summary of the positive findings, or a normal statement."""
    parts = []
    if c.pneumothorax:
        parts.append(pick(rng, (f"{cap(c.ptx_size)} {c.pneumothorax} pneumothorax.",
                                f"{cap(c.pneumothorax)} pneumothorax is present.")))
    if c.opacity:
        side, level = c.opacity.split()
        parts.append(pick(rng, (f"{cap(side)} {level} zone opacity, possibly pneumonia.",
                                f"{cap(side)} {level} opacity concerning for infection.",
                                f"Focal {side} {level} lung consolidation.")))
    if c.effusion:
        where = "bilateral" if c.effusion == "both" else c.effusion
        parts.append(pick(rng, (f"{cap(c.effusion_size)} {where} pleural effusion"
                                f"{'s' if c.effusion == 'both' else ''}.",
                                f"{cap(where)} pleural effusion{'s' if c.effusion == 'both' else ''}.")))
    if c.cardiomegaly:
        parts.append(pick(rng, ("Cardiomegaly without edema.", f"Stable {c.cardio_grade} cardiomegaly.",
                                "Enlarged cardiac silhouette.")))
    if c.nodules:
        parts.append(pick(rng, (f"{cap(NUMBER_WORDS[c.nodules])} pulmonary "
                                f"nodule{'s' if c.nodules > 1 else ''}; recommend CT follow-up.",
                                f"Pulmonary nodule{'s' if c.nodules > 1 else ''}, "
                                "further evaluation with chest CT suggested.")))
    if c.device:
        parts.append(f"{cap(c.device)} in place.")
    if not parts or (parts and c.device and len(parts) == 1):
        parts.append(pick(rng, ("No acute cardiopulmonary process.",
                                "No acute cardiopulmonary abnormality.",
                                "No acute intrathoracic process.")))
    return " ".join(parts)


# ----------------------------------------------------------------------------- reading reports back

# The words that state each IC class in this generator's sentences (word prefixes, so that
# "effusions", "nodular" and "lines" match): a CheXpert-labeler-like rule set for its vocabulary.
LABEL_TERMS = {
    "opacity": ("opacity", "opacification", "consolidation"),
    "effusion": ("effusion",),
    "cardiomegaly": ("cardiomegaly", "enlarged", "enlargement"),
    "pneumothorax": ("pneumothorax",),
    "nodule": ("nodule", "nodular"),
    "device": ("tube", "catheter", "pacemaker", "line", "devices"),
}
NEGATIONS = frozenset(("no", "not", "without"))


def label_report(text: str) -> list[int]:
    """The IC_CLASSES a report states as present (1) or not (0), read back by rules as the
    CheXpert labeler reads MIMIC-CXR reports: a class is present when one of its words occurs in
    a sentence with no negation word before it ("No pneumothorax or pleural effusion is seen."
    states neither); a "nodular opacity" is a nodule, not an opacity; never mentioned is 0.
    Exact on every report this generator writes (a test); scores generated reports (clinical
    efficacy, metrics.clinical_efficacy)."""
    present = set()
    for sentence in text.lower().split("."):
        words = re.findall(r"[a-z]+", sentence)
        for i, word in enumerate(words):
            if NEGATIONS.isdisjoint(words[:i]):
                present |= {name for name, terms in LABEL_TERMS.items() if word.startswith(terms)
                            and not (name == "opacity" and "nodular" in words)}
    return [int(name in present) for name in IC_CLASSES]


# ----------------------------------------------------------------------------- NLI and VQA

ATTRIBUTES = ("opacity", "effusion", "cardiomegaly", "pneumothorax", "nodule", "device")


def _value(c: Case, attribute: str):
    return {"opacity": c.opacity, "effusion": c.effusion, "cardiomegaly": c.cardiomegaly,
            "pneumothorax": c.pneumothorax, "nodule": c.nodules, "device": c.device}[attribute]


def _contradicting_values(attribute: str, value) -> list:
    """Values that cannot hold together with `value` (a different side/count, or a flip of
    presence; a different device type is not a contradiction, a second device could exist)."""
    options = {"opacity": [None, "right", "left"], "effusion": [None, "right", "left", "both"],
               "cardiomegaly": [False, True], "pneumothorax": [None, "right", "left"],
               "nodule": [0, 1, 2, 3], "device": [None, "some"]}[attribute]
    if attribute == "opacity":
        value = value.split()[0] if value else None
        return [o for o in options if (o is None) != (value is None)]
    if attribute == "device":
        value = "some" if value else None
    return [o for o in options if o != value]


def hypothesis(attribute: str, value, rng) -> str:
    """A statement asserting `value` of `attribute`, phrased unlike the report templates."""
    if attribute == "opacity":
        side = value.split()[0] if value else None
        return pick(rng, (f"There is airspace disease in the {side} lung.",
                          f"The {side} lung shows a focal opacity.")) if side else pick(
            rng, ("Both lungs are free of airspace disease.", "No pneumonia is evident."))
    if attribute == "effusion":
        return {None: pick(rng, ("The pleural spaces are clear of fluid.", "No fluid is seen in the pleural spaces.")),
                "both": pick(rng, ("Fluid is present in both pleural spaces.", "The patient has effusions on both sides.")),
                }.get(value) or pick(rng, (f"Fluid is present in the {value} pleural space.",
                                           f"Only the {value} side has an effusion."))
    if attribute == "cardiomegaly":
        return pick(rng, ("The heart is big.", "The cardiac size is increased.")) if value else pick(
            rng, ("The heart is of normal size.", "There is no cardiomegaly."))
    if attribute == "pneumothorax":
        return pick(rng, (f"Air is present in the {value} pleural space.", f"The {value} lung has collapsed partially.")) \
            if value else pick(rng, ("There is no air in the pleural space.", "Both lungs are fully expanded."))
    if attribute == "nodule":
        return {0: pick(rng, ("The lungs contain no nodules.", "No nodules are present.")),
                1: pick(rng, ("Exactly one nodule is present.", "The lungs contain a single nodule."))}.get(
            value) or pick(rng, (f"Exactly {NUMBER_WORDS[value]} nodules are present.",
                                 f"The lungs contain {NUMBER_WORDS[value]} nodules."))
    return pick(rng, ("A medical device is present.", "Some hardware projects over the chest.")) if value \
        else pick(rng, ("The patient has no medical devices.", "There are no lines or tubes."))


def nli_pair(c: Case, tagged: list[tuple[str, set]], rng) -> tuple[str, str, str]:
    """(premise, hypothesis, label): premise = 1-2 attribute sentences of the findings;
    entailment/contradiction assert a true/false value of a covered attribute, neutral asserts
    any value of an attribute the premise does not mention."""
    picks = rng.choice(len(tagged), size=min(len(tagged), int(rng.integers(1, 3))), replace=False)
    chosen = [tagged[i] for i in sorted(picks)]
    covered = set().union(*(a for _, a in chosen))
    label = pick(rng, TC_CLASSES)
    if label == "neutral":
        attribute = pick(rng, [a for a in ATTRIBUTES if a not in covered])
        value = _value(sample_case(rng), attribute)
    else:
        attribute = pick(rng, sorted(covered))
        value = _value(c, attribute)
        if label == "contradiction":
            value = pick(rng, _contradicting_values(attribute, value))
    if attribute == "device" and value == "some":
        value = "present"
    if attribute == "opacity" and value in SIDES:
        value = f"{value} lower"
    return " ".join(s for s, _ in chosen), hypothesis(attribute, value, rng), label


def vqa_questions(c: Case, rng) -> list[tuple[str, str, str]]:
    """One closed (yes/no) and one open question per case: [(question, answer, answer_type)]."""
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    side = pick(rng, SIDES)
    closed = [
        (pick(rng, ("Is there a pleural effusion?", "Is pleural fluid present?")), yes(c.effusion)),
        (pick(rng, ("Is the heart enlarged?", "Is there cardiomegaly?")), yes(c.cardiomegaly)),
        (pick(rng, ("Is there a pneumothorax?", "Is a pneumothorax present?")), yes(c.pneumothorax)),
        (pick(rng, ("Are there any lung nodules?", "Is a pulmonary nodule visible?")), yes(c.nodules)),
        (pick(rng, ("Is there a support device?", "Is a line or tube present?")), yes(c.device)),
        (f"Is there an opacity in the {side} lung?", yes(c.opacity and c.opacity.startswith(side))),
        (f"Is there a {side} pleural effusion?", yes(c.effusion in (side, "both"))),
    ]
    opened = [(pick(rng, ("How many nodules are there?", "How many lung nodules are seen?")),
               str(c.nodules))]
    if c.opacity:
        opened += [(pick(rng, ("Where is the opacity?", "In which zone is the opacity?")), c.opacity),
                   ("Which lung has the opacity?", c.opacity.split()[0])]
    if c.effusion:
        opened.append((pick(rng, ("Which side is the effusion on?", "Where is the pleural effusion?")),
                       c.effusion))
    if c.pneumothorax:
        opened.append(("Which side is the pneumothorax on?", c.pneumothorax))
    if c.device:
        opened.append((pick(rng, ("What device is present?", "What kind of line or tube is seen?")),
                       c.device.lower()))
    q_closed, q_open = pick(rng, closed), pick(rng, opened)
    return [(q_closed[0], q_closed[1], "closed"), (q_open[0], q_open[1], "open")]


# ----------------------------------------------------------------------------- the benchmark

def make_case(seed: int, index: int, image_size: int) -> dict:
    """Everything about case `index`, from its own generator (so order/workers do not matter)."""
    rng = np.random.default_rng([seed, index])
    case = sample_case(rng)
    header, findings, tagged = write_findings(case, rng)
    return {"case": case, "report": f"{header} {findings}", "findings": findings,
            "impression": write_impression(case, rng),
            "nli": nli_pair(case, tagged, rng), "vqa": vqa_questions(case, rng),
            "pixels": render(case, image_size, rng)}


def _labels(c: Case) -> list[int]:
    return [int(bool(v)) for v in (c.opacity, c.effusion, c.cardiomegaly, c.pneumothorax,
                                   c.nodules, c.device)]


def task_records(items: list[dict], splits: list[str]) -> dict[str, list[dict]]:
    """Records of every task folder from the generated cases (ids: case id + suffix)."""
    tasks = {t: [] for t in data.TASK_FIELDS}
    for it, split in zip(items, splits):
        cid, image = it["id"], f"{it['id']}.png"
        base = {"id": cid, "split": split}
        tasks["pretrain"].append({**base, "image": image, "texts": [it["report"], it["impression"]]})
        tasks["ic"].append({**base, "image": image, "labels": _labels(it["case"])})
        premise, hyp, label = it["nli"]
        tasks["tc"].append({**base, "text_a": premise, "text_b": hyp, "label": label})
        tasks["ts"].append({**base, "source": it["report"], "target": it["impression"]})
        tasks["retrieval"].append({**base, "image": image, "text": it["report"]})
        tasks["itg"].append({**base, "image": image, "report": it["findings"]})
        for k, (question, answer, kind) in enumerate(it["vqa"]):
            tasks["vqa"].append({"id": f"{cid}-q{k}", "split": split, "image": image,
                                 "question": question, "answer": answer, "answer_type": kind})
    return tasks


def constant_rouge_l(constant: str, references: list[str]) -> float:
    """Corpus ROUGE-L (metrics.rouge_l, as the benchmark reports it) of answering `constant` to all."""
    return metrics.rouge_l([metrics.normalize_text(constant)] * len(references),
                            [[metrics.normalize_text(r)] for r in references])


def duplicate_rate(texts: list[str]) -> float:
    """Fraction of texts whose exact string occurs more than once in `texts`."""
    counts = Counter(texts)
    return sum(counts[t] > 1 for t in texts) / max(1, len(texts))


def _majority_accuracy(train: list, test: list) -> float:
    top = Counter(train).most_common(1)[0][0]
    return sum(t == top for t in test) / max(1, len(test))


def chance_levels(tasks: dict[str, list[dict]]) -> dict:
    """Chance / trivial-baseline level of each task's metric on the test split."""
    def part(task, split):
        return [r for r in tasks[task] if r["split"] == split]
    ic_test = part("ic", "test")
    prevalence = {c: sum(r["labels"][i] for r in ic_test) / max(1, len(ic_test))
                  for i, c in enumerate(IC_CLASSES)}
    ts_const = Counter(r["target"] for r in part("ts", "train")).most_common(1)[0][0]
    itg_const = Counter(r["report"] for r in part("itg", "train")).most_common(1)[0][0]
    n_ret = len(part("retrieval", "test"))
    vqa = {"all": {}, "closed": {}, "open": {}}
    for kind in vqa:
        tr = [r for r in part("vqa", "train") if kind == "all" or r["answer_type"] == kind]
        te = [r for r in part("vqa", "test") if kind == "all" or r["answer_type"] == kind]
        prior = {}
        for r in tr:
            prior.setdefault(r["question"], Counter())[r["answer"]] += 1
        top = Counter(r["answer"] for r in tr).most_common(1)[0][0]
        vqa[kind] = {"majority_answer": _majority_accuracy([r["answer"] for r in tr],
                                                           [r["answer"] for r in te]),
                     "question_prior": sum(
                         r["answer"] == (prior[r["question"]].most_common(1)[0][0]
                                         if r["question"] in prior else top)
                         for r in te) / max(1, len(te))}
    return {
        "ic": {"macro_auroc": 0.5, "test_prevalence": prevalence},
        "tc": {"majority_class_accuracy": _majority_accuracy(
            [r["label"] for r in part("tc", "train")], [r["label"] for r in part("tc", "test")])},
        "ts": {"constant_impression": ts_const, "rouge_l": constant_rouge_l(ts_const, [r["target"] for r in part("ts", "test")])},
        "retrieval": {"n_test": n_ret, **{f"R@{k}": k / n_ret for k in (1, 5, 10)}},
        "itg": {"constant_report_rouge_l": constant_rouge_l(itg_const, [r["report"] for r in part("itg", "test")])},
        "vqa": vqa,
    }


def _render_job(args):
    seed, index, image_size, folder = args
    item = make_case(seed, index, image_size)
    item["id"] = f"case{index:05d}"
    Image.fromarray(item.pop("pixels")).save(folder / f"{item['id']}.png", optimize=False)
    return item


def generate(out, n_train=3000, n_val=300, n_test=1000, seed=0, image_size=128,
             vocab_size=3000, workers=2) -> dict:
    """Write images, seven task folders, tokenizer.json, summary.json and README.md under
    `out`; returns the summary."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    jobs = [(seed, i, image_size, out / "images") for i in range(len(splits))]
    if workers > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            items = pool.map(_render_job, jobs, chunksize=64)
    else:
        items = [_render_job(j) for j in jobs]
    tasks = task_records(items, splits)
    answers = sorted({r["answer"] for r in tasks["vqa"] if r["split"] != "test"})
    for task, records in tasks.items():
        meta = {"task": task, "name": f"synth-{task}", "image_root": "../images", "seed": seed,
                "dropped": {}, "source": "synth.py (synthetic chest radiographs)"}
        meta.update({"ic": {"classes": IC_CLASSES}, "tc": {"classes": TC_CLASSES},
                     "vqa": {"answers": answers}}.get(task, {}))
        data.write_manifest(out / task, records, meta)
    train_texts = [t for it, s in zip(items, splits) if s == "train"
                   for t in (it["report"], it["impression"], *it["nli"][:2],
                             *(q for q, _, _ in it["vqa"]))]
    tok = Tokenizer.train(train_texts, vocab_size, out / "tokenizer.json")
    test = [it for it, s in zip(items, splits) if s == "test"]
    seen = {key: {it[key] for it, s in zip(items, splits) if s == "train"} for key in ("report", "findings")}
    summary = {
        "version": VERSION, "seed": seed, "image_size": image_size, "tokenizer_vocab_size": tok.vocab_size,
        "cases": {"train": n_train, "val": n_val, "test": n_test},
        "counts": {t: Counter(r["split"] for r in rs) for t, rs in tasks.items()},
        "duplicate_rate_test_reports": duplicate_rate([it["report"] for it in test]),
        "duplicate_rate_test_findings": duplicate_rate([it["findings"] for it in test]),
        "duplicate_rate_test_impression": duplicate_rate([it["impression"] for it in test]),
        "test_reports_seen_in_train": sum(it["report"] in seen["report"] for it in test) / max(1, len(test)),
        "test_findings_seen_in_train": sum(it["findings"] in seen["findings"] for it in test) / max(1, len(test)),
        "chance": chance_levels(tasks),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "README.md").write_text(readme(summary))
    return summary


def readme(s: dict) -> str:
    """A human-readable summary of summary.json."""
    ch = s["chance"]
    lines = [
        "# Synthetic chest-radiograph benchmark (generated by synth.py)", "",
        f"Seed {s['seed']}, {s['image_size']} px grayscale PNGs, cases: {s['cases']}.",
        "Sides are the patient's (patient's right = image left).", "",
        "## Records per task and split", "",
        *(f"- {t}: {dict(c)}" for t, c in s["counts"].items()), "",
        "## Report uniqueness", "",
        f"- test reports (header + findings) that are not unique within test: {s['duplicate_rate_test_reports']:.2%}",
        f"- test findings (the itg target) that are not unique within test: {s['duplicate_rate_test_findings']:.2%}",
        f"- test impressions that are not unique within test: {s['duplicate_rate_test_impression']:.2%}",
        f"- test reports identical to some train report: {s['test_reports_seen_in_train']:.2%}",
        f"- test findings identical to some train findings: {s['test_findings_seen_in_train']:.2%}", "",
        "## Chance / trivial-baseline levels (test split)", "",
        f"- ic: macro AUROC 0.5; prevalence {json.dumps({k: round(v, 3) for k, v in ch['ic']['test_prevalence'].items()})}",
        f"- tc: majority-class accuracy {ch['tc']['majority_class_accuracy']:.3f}",
        f"- ts: ROUGE-L {ch['ts']['rouge_l']:.3f} for always answering '{ch['ts']['constant_impression']}'",
        f"- retrieval: R@1/5/10 = {ch['retrieval']['R@1']:.3f}/{ch['retrieval']['R@5']:.3f}/"
        f"{ch['retrieval']['R@10']:.3f} (N = {ch['retrieval']['n_test']})",
        f"- itg: ROUGE-L {ch['itg']['constant_report_rouge_l']:.3f} for the most frequent train report",
        *(f"- vqa {k}: majority answer {v['majority_answer']:.3f}, best answer per question "
          f"(text-only prior) {v['question_prior']:.3f}" for k, v in ch["vqa"].items()), "",
    ]
    return "\n".join(lines)


def preview(out, n: int = 8) -> Path:
    """Grid of the first `n` test cases: image, findings, impression and VQA answers."""
    import textwrap
    out = Path(out)
    pre, _ = data.read_manifest(out / "pretrain", "test")
    vqa, _ = data.read_manifest(out / "vqa", "test")
    panel_h, img_px, text_w = 200, 192, 560
    sheet = Image.new("RGB", (img_px + text_w + 20, panel_h * n), "white")
    draw = ImageDraw.Draw(sheet)
    for row, rec in enumerate(pre[:n]):
        im = Image.open(out / "images" / rec["image"]).convert("RGB").resize((img_px, img_px))
        sheet.paste(im, (4, row * panel_h + 4))
        qa = [f"Q: {q['question']} A: {q['answer']}" for q in vqa if q["image"] == rec["image"]]
        text = [rec["id"]] + textwrap.wrap("F: " + rec["texts"][0], 88) + \
            textwrap.wrap("I: " + rec["texts"][1], 88) + qa
        draw.multiline_text((img_px + 14, row * panel_h + 4), "\n".join(text[:15]), fill="black")
    sheet.save(out / "preview.png")
    return out / "preview.png"


def ensure(root) -> None:
    """Create the default benchmark in `root` when it is not there (the default run's first use)."""
    if not (Path(root) / "pretrain" / "manifest.jsonl").exists():
        print(f"creating the synthetic benchmark in {root} ...", flush=True)
        main(["--out", str(root)])


def check_version(root) -> None:
    """Refuse a benchmark folder written by another version of this generator (its tasks differ)."""
    path = Path(root) / "summary.json"
    version = json.loads(path.read_text()).get("version", 1) if path.is_file() else None
    if version != VERSION:
        raise SystemExit(f"{path}: synthetic benchmark version {version}, this synth.py writes version "
                         f"{VERSION} (version 2: the itg target lost its header lines); regenerate "
                         f"it with: python synth.py --out {root}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/synth", help="output folder (created)")
    p.add_argument("--train", type=int, default=3000, help="training cases")
    p.add_argument("--val", type=int, default=300, help="validation cases")
    p.add_argument("--test", type=int, default=1000, help="test cases (>= 1000 for retrieval R@K)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--image-size", type=int, default=128, help="rendered image side in pixels")
    p.add_argument("--vocab-size", type=int, default=3000, help="BPE vocabulary size (max)")
    p.add_argument("--workers", type=int, default=2, help="rendering processes (1 = in-process)")
    p.add_argument("--preview", action="store_true", help="also write OUT/preview.png")
    a = p.parse_args(argv)
    start = time.time()
    s = generate(a.out, a.train, a.val, a.test, a.seed, a.image_size, a.vocab_size, a.workers)
    if a.preview:
        preview(a.out)
    print(f"wrote {a.out} in {time.time() - start:.1f}s: {sum(s['cases'].values())} cases, "
          f"vocab {s['tokenizer_vocab_size']}, test duplicate rate: reports "
          f"{s['duplicate_rate_test_reports']:.2%}, findings {s['duplicate_rate_test_findings']:.2%}")


if __name__ == "__main__":
    main()
