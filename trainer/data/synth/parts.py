"""Object classes of the synthetic set, drawn in code: a screw, a washer and a small circuit board.

Each renderer draws one part on its background from the scene stream and,
when asked, its defect from the defect stream: geometric ones (a missing
piece, an extra one) here, scratches and stains through `defects`.
"""
from __future__ import annotations

import itertools
import math

import cv2
import numpy as np

from .defects import _scratch, _surface_defect
from .draw import Rendered, _cover, _frame, _noise, _paint, _pick, _sd_box, _sd_segment, _shift, _surface


# ----------------------------------------------------------------------------- object: screw

def _render_screw(h: int, w: int, rng: np.random.Generator, defect: str | None,
                 drng: np.random.Generator) -> Rendered:
    """A pan-head screw lying on a matte plate, seen from above, pointing left or right."""
    size = h
    px = size / 256
    rgb = _surface(h, w, rng, (0.78, 0.78, 0.76), grain=0.03, mottle=0.015)
    angle = (180.0 if rng.random() < 0.5 else 0.0) + rng.uniform(-20, 20)
    cx, cy = w / 2 + rng.uniform(-0.06, 0.06) * w, h / 2 + rng.uniform(-0.08, 0.08) * h
    u, v = _frame(h, w, cx, cy, angle)
    length = 0.8 * size * rng.uniform(0.985, 1.015)   # part-to-part tolerance
    u0, u1 = -length / 2, length / 2
    lh, rh, r = 0.14 * size, 0.12 * size, 0.052 * size
    neck, tip, pitch = u0 + lh, u1 - 0.12 * size, 0.036 * size
    profile = np.where(u < tip, r, r * (1 - 0.85 * np.clip((u - tip) / (u1 - tip), 0, 1)))
    phase = (u - 0.45 * v) / pitch
    threaded = u > neck + 0.07 * size
    tooth = 2 * np.abs(phase - np.floor(phase) - 0.5)   # 1 on a crest, 0 in a root
    radius = np.where(threaded, profile * (0.9 + 0.12 * tooth), profile)
    d_shaft = np.maximum(np.abs(v) - radius, np.maximum(neck - 1 - u, u - u1))
    d_head = _sd_box(u - (u0 + lh / 2), v, lh / 2, rh, 0.35 * lh)

    def body(d_shaft: np.ndarray, d_head: np.ndarray) -> np.ndarray:
        return _cover(np.minimum(d_shaft, d_head))

    cov = body(d_shaft, d_head)
    mask = None
    if defect == "missing":
        good = cov
        for _ in range(20):
            if drng.random() < 0.6:   # the tip broken off, a jagged fracture across the shaft
                cut = u1 - drng.uniform(0.05, 0.35) * (u1 - neck)
                jag = px * 1.5 * (np.sin(v / (2 * px) + drng.uniform(0, 6)) + 0.5 * np.sin(v / (0.8 * px)))
                cov = body(np.maximum(d_shaft, u - cut - jag), d_head)
            else:                    # a chip out of the head's rim
                rc = drng.uniform(0.02, 0.06) * size
                wobble = drng.uniform(-0.3, 0.3) * rc
                if drng.random() < 0.5:   # on the end face
                    pu, pv = u0 + wobble, drng.uniform(-0.8, 0.8) * rh
                else:                    # on the upper or lower edge
                    pu, pv = u0 + drng.uniform(0.15, 0.85) * lh, (rh if drng.random() < 0.5 else -rh) + wobble
                cov = body(d_shaft, np.maximum(d_head, rc - np.hypot(u - pu, v - pv)))
            mask = (good - cov) >= 0.5
            if mask.sum() >= 6 * px * px:
                break
    # metal: a bright band where the light meets the cylinder, darker flanks, crests lit in the thread
    nv = np.clip(np.where(u < neck, v / rh, v / np.maximum(profile, 1)), -1, 1)
    light = rng.uniform(-0.45, 0.45)
    shade = 0.5 + 0.3 * np.sqrt(1 - nv * nv) + 0.45 * np.exp(-(((nv - light) / 0.3) ** 2))
    crest = 0.5 + 0.5 * np.cos(2 * np.pi * phase)
    shade = np.where(threaded, shade * (0.7 + 0.4 * crest * crest), shade)
    shade = shade * (1 + 0.03 * _noise(h, w, rng, 1.0))
    metal = shade[..., None] * (np.float32([0.6, 0.61, 0.64]) * (1 + rng.normal(0, 0.008, 3)).astype(np.float32))
    shadow = cv2.GaussianBlur(_shift(cov, 3 * px, 4 * px), (0, 0), 3 * px)
    rgb *= (1 - 0.35 * shadow)[..., None]
    _paint(rgb, cov, metal)
    return _surface_defect(rgb, drng, defect, cov, mask)


# ----------------------------------------------------------------------------- object: washer

def _render_washer(h: int, w: int, rng: np.random.Generator, defect: str | None,
                  drng: np.random.Generator) -> Rendered:
    """A zinc-plated flat washer on a dark rubber mat, lit from one side."""
    size = min(h, w)
    px = size / 256
    rgb = _surface(h, w, rng, (0.2, 0.21, 0.22), grain=0.08, mottle=0.05, cell=12)
    cx, cy = w / 2 + rng.uniform(-0.07, 0.07) * w, h / 2 + rng.uniform(-0.07, 0.07) * h
    u, v = _frame(h, w, cx, cy, rng.uniform(0, 360))
    rho, th = np.hypot(u, v), np.arctan2(v, u)
    ro, ri = 0.34 * size * rng.uniform(0.99, 1.01), 0.155 * size * rng.uniform(0.99, 1.01)
    d_ring = np.maximum(rho - ro, ri - rho)
    cov = _cover(d_ring)
    mask = None
    if defect == "missing":
        good = cov
        for _ in range(20):
            outer = drng.random() < 0.7
            rc = drng.uniform(0.015, 0.07) * size
            psi = drng.uniform(-math.pi, math.pi)
            at = ro + 0.3 * rc if outer else ri - 0.3 * rc
            pu, pv = at * math.cos(psi), at * math.sin(psi)
            e = drng.uniform(1.0, 1.8)   # an elongated bite along the rim
            du, dv = u - pu, v - pv
            along = (-du * math.sin(psi) + dv * math.cos(psi)) / e
            across = du * math.cos(psi) + dv * math.sin(psi)
            cov = _cover(np.maximum(d_ring, rc - np.hypot(along, across)))
            mask = (good - cov) >= 0.5
            if mask.sum() >= 6 * px * px:
                break
    phi = rng.uniform(-math.pi, math.pi)   # where the light comes from
    rings = cv2.GaussianBlur(rng.standard_normal((1, 256)).astype(np.float32), (0, 0), 1.5).ravel()
    lathe = np.interp(rho, np.linspace(0, ro + 2, 256), 1 + 0.03 * rings / rings.std()).astype(np.float32)
    edge = np.minimum(np.abs(rho - ro), np.abs(rho - ri))
    bevel = np.exp(-((edge / (2.5 * px)) ** 2)) * np.cos(th - phi) * np.sign(rho - (ro + ri) / 2)
    shade = (lathe * (1 + rng.uniform(0.05, 0.12) * np.cos(th - phi)) + 0.25 * bevel).astype(np.float32)
    shade *= 1 + 0.025 * _noise(h, w, rng, 1.0)
    metal = shade[..., None] * (np.float32([0.7, 0.72, 0.76]) * (1 + rng.normal(0, 0.008, 3)).astype(np.float32))
    shadow = cv2.GaussianBlur(_shift(cov, 3 * px, 4 * px), (0, 0), 3 * px)
    rgb *= (1 - 0.5 * shadow)[..., None]
    _paint(rgb, cov, metal)
    return _surface_defect(rgb, drng, defect, cov, mask)


# ----------------------------------------------------------------------------- object: pcb

def _render_pcb(h: int, w: int, rng: np.random.Generator, defect: str | None,
               drng: np.random.Generator) -> Rendered:
    """A small board: an SOIC-14 chip, four 0805 parts, traces, silkscreen and mounting holes."""
    size = min(h, w)
    px = size / 256
    rgb = _surface(h, w, rng, (0.3, 0.3, 0.32), grain=0.06, mottle=0.04, cell=16)
    cx, cy = w / 2 + rng.uniform(-0.035, 0.035) * w, h / 2 + rng.uniform(-0.035, 0.035) * h
    u, v = _frame(h, w, cx, cy, rng.uniform(-2, 2))
    u, v = u / size, v / size   # board units: fractions of the image side

    def cover(d: np.ndarray) -> np.ndarray:
        return _cover(d * size)

    def jitter() -> float:   # placement tolerance of the pick-and-place machine
        return float(rng.normal(0, 0.0015))

    board = cover(_sd_box(u, v, 0.43, 0.35, 0.02))
    shadow = cv2.GaussianBlur(_shift(board, 2 * px, 3 * px), (0, 0), 3 * px)
    rgb *= (1 - 0.45 * shadow)[..., None]
    solder_mask = np.float32([0.1, 0.37, 0.2]) * (1 + rng.normal(0, 0.01, 3)).astype(np.float32)
    sheen = (1 + 0.04 * _noise(h, w, rng, 40 * px) + 0.03 * _noise(h, w, rng, 1.0))[..., None]
    _paint(rgb, board, sheen * solder_mask)

    ic_u, ic_v, pitch, n_pins = -0.12 + jitter(), 0.0 + jitter(), 0.03, 7
    first = ic_u - pitch * (n_pins - 1) / 2
    rows = (-0.095, 0.095)
    pas_u, pas_v = 0.22, np.array([-0.18, -0.06, 0.06, 0.18])
    # traces under the solder mask show as lighter green
    lead = {k: first + k * pitch for k in (0, 4, 6)}
    routes = []
    for sign in (-1, 1):   # mirrored above and below the chip; outer leads to outer parts, no crossings
        routes += [
            [(lead[4], 0.095 * sign), (lead[4], 0.18 * sign), (pas_u - 0.04, 0.18 * sign)],
            [(lead[6], 0.095 * sign), (lead[6], 0.13 * sign), (0.12, 0.13 * sign), (0.12, 0.06 * sign),
             (pas_u - 0.04, 0.06 * sign)],
            [(lead[0], 0.095 * sign), (lead[0], 0.22 * sign), (-0.33, 0.22 * sign)],
        ]
    routes.append([(pas_u + 0.04, -0.3), (pas_u + 0.04, 0.3)])   # a common return under the parts' far pads
    traces = [pair for route in routes for pair in itertools.pairwise(route)]
    d_tr = np.min([_sd_segment(u, v, a, b, 0.006) for a, b in traces], axis=0)
    _paint(rgb, 0.55 * cover(d_tr) * board, sheen * np.float32([0.2, 0.52, 0.28]))

    # silkscreen outlines
    silk = np.float32([0.9, 0.9, 0.86])
    _paint(rgb, cover(np.abs(_sd_box(u - ic_u, v - ic_v, 0.125, 0.125)) - 0.003), silk)
    iv = np.clip(np.round((v - pas_v[0]) / 0.12), 0, 3)
    vp = v - (pas_v[0] + 0.12 * iv)
    _paint(rgb, cover(np.abs(_sd_box(u - pas_u, vp, 0.065, 0.04)) - 0.0025), silk)

    # exposed pads (tinned), then the parts on them
    tin = np.float32([0.78, 0.78, 0.74])
    iu = np.clip(np.round((u - first) / pitch), 0, n_pins - 1)
    up = u - (first + pitch * iu)
    pads = np.min([_sd_box(up, v - (ic_v + row), 0.009, 0.022) for row in rows], axis=0)
    pads = np.minimum(pads, _sd_box(np.abs(u - pas_u) - 0.036, vp, 0.017, 0.026))
    holes = (np.abs(u) - 0.37, np.abs(v) - 0.29)
    _paint(rgb, cover(np.abs(np.hypot(*holes) - 0.026) - 0.01), np.float32([0.85, 0.7, 0.36]))
    _paint(rgb, cover(np.hypot(*holes) - 0.016), np.float32([0.05, 0.05, 0.05]))
    _paint(rgb, cover(pads), tin * (1 + 0.05 * _noise(h, w, rng, 1.0))[..., None])

    missing_pin = missing_part = -1
    if defect == "missing":
        if drng.random() < 0.3:
            missing_pin = int(drng.integers(2 * n_pins))       # one lead, a subtle one
        else:
            missing_part = int(drng.integers(4))

    pin_rows = []
    for r_i, row in enumerate(rows):
        d = _sd_box(up, v - (ic_v + row * 0.92), 0.006, 0.02)
        if missing_pin // n_pins == r_i:
            d = np.where(iu == missing_pin % n_pins, np.inf, d)
        pin_rows.append(d)
    pins = cover(np.min(pin_rows, axis=0))
    body = cover(_sd_box(u - ic_u, v - ic_v, 0.11, 0.075, 0.004))
    grad = (1 + 0.15 * (u - ic_u - (v - ic_v)) / 0.1)[..., None]   # moulded body catches the light
    parts_d = _sd_box(u - pas_u, vp, 0.04, 0.021, 0.003)
    caps_d = _sd_box(np.abs(u - pas_u) - 0.032, vp, 0.009, 0.021, 0.002)
    gone = None
    if missing_part >= 0:
        gone = cover(np.minimum(parts_d, caps_d)) * (iv == missing_part)
        parts_d = np.where(iv == missing_part, np.inf, parts_d)
        caps_d = np.where(iv == missing_part, np.inf, caps_d)
    parts, caps = cover(parts_d), cover(caps_d)
    dot = cover(np.hypot(u - (ic_u - 0.08), v - (ic_v + 0.045)) - 0.008)
    part_colour = np.where((iv % 2 == 0)[..., None], np.float32([0.1, 0.1, 0.1]), np.float32([0.62, 0.5, 0.36]))

    layers = [(pins, tin * 1.05), (body, grad * np.float32([0.1, 0.1, 0.11])), (dot, np.float32([0.3, 0.3, 0.31])),
              (parts, part_colour), (caps, tin)]
    mask = None
    if missing_pin >= 0:
        # the lead's visible part: where it would show beside the body
        full_pins = cover(np.min([_sd_box(up, v - (ic_v + row * 0.92), 0.006, 0.02) for row in rows], axis=0))
        gone = (full_pins - pins) * (1 - body)
    if gone is not None:
        mask = gone >= 0.5
    for cov, colour in layers:
        _paint(rgb, cov, colour)

    if defect == "extra":
        mask = _pcb_extra(rgb, drng, u, v, size, first, pitch, n_pins, ic_v, rows, board, body)
    if defect == "scratch":
        # a scuff through the solder mask: to bare copper when deep, paler green when not
        parts_area = np.maximum(cover(_sd_box(u - ic_u, v - ic_v, 0.13, 0.13)),
                                cover(_sd_box(u - pas_u, v, 0.08, 0.27)))
        free = board * (1 - parts_area)
        free = cv2.erode(free, np.ones((5, 5), np.uint8))
        colour = (0.78, 0.5, 0.3) if drng.random() < 0.5 else (0.3, 0.55, 0.38)
        for _ in range(20):
            out, m = _scratch(rgb, drng, bright=True, region=free, length=(0.05, 0.3), wiggle=0.04, colour=colour)
            if m.sum() >= 6 * px * px:
                return out, m
        raise RuntimeError("could not place a scratch on the board")
    return rgb, mask


def _pcb_extra(rgb: np.ndarray, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, size: int,
               first: float, pitch: float, n_pins: int, ic_v: float, rows: tuple[float, float],
               board: np.ndarray, body: np.ndarray) -> np.ndarray:
    """A solder bridge between two neighbouring leads, or a stray 0402 part dropped on the board."""
    h, w = rgb.shape[:2]
    px = size / 256
    if rng.random() < 0.5:
        k = int(rng.integers(n_pins - 1))
        row = rows[int(rng.integers(2))]
        bu, bv = first + (k + 0.5) * pitch, ic_v + row * rng.uniform(0.85, 1.05)
        half = pitch / 2 + rng.uniform(0.0, 0.008)
        d = _sd_box(u - bu, v - bv, half, rng.uniform(0.006, 0.014), 0.006)
        cov = _cover(d * size)
        glint = 1 + 0.4 * np.exp(-(((u - bu) * size / (2 * px)) ** 2 + ((v - bv) * size / (2 * px)) ** 2))
        _paint(rgb, cov, glint[..., None] * np.float32([0.8, 0.8, 0.77]))
        return cov >= min(0.5, 0.5 * float(cov.max()))   # at small sizes a bridge is thinner than a pixel
    free = cv2.erode(board * (1 - body), np.ones((9, 9), np.uint8))
    for _ in range(20):
        x, y = _pick(rng, h, w, free)
        a = rng.uniform(0, 360)
        uu, vv = _frame(h, w, x, y, a)
        scale = rng.uniform(0.7, 1.1)
        body_d = _sd_box(uu, vv, 0.016 * size * scale, 0.008 * size * scale, px)
        ends = _sd_box(np.abs(uu) - 0.013 * size * scale, vv, 0.004 * size * scale, 0.008 * size * scale, px * 0.5)
        cov = _cover(body_d)
        shadow = cv2.GaussianBlur(_shift(cov, 1.5 * px, 2 * px), (0, 0), 1.5 * px)
        mask = cov >= 0.5
        if mask.sum() >= 6 * px * px:
            rgb *= (1 - 0.4 * shadow)[..., None]
            _paint(rgb, cov, np.float32([0.6, 0.48, 0.34]))
            _paint(rgb, _cover(ends), np.float32([0.78, 0.78, 0.74]))
            return mask
    raise RuntimeError("could not place an extra part on the board")
