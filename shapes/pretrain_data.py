"""Pretraining examples of the shapes world: a miniature of BAGEL's pretraining mixture.

Tasks (each a chat-formatted row of text turns and images):
    t2i        user: prompt                                  -> image (flow matching)
    t2i_think  system: think-first, user: prompt, assistant: <think> plan </think> -> image
               (plan: the explicit restatement, or with --plans commit also the colours drawn)
    edit       image (VAE + ViT), user: instruction          -> edited image
    caption    image (ViT), user: describe                   -> assistant: caption
    vqa        image (ViT), user: atomic question            -> assistant: yes / no
    fact_qa    user: "what colour is grass?"                 -> assistant: green

The generation captions follow a realistic skew: mostly single objects and pairs, rarely exact
counts of 3-4 or spatial relations. World facts appear ONLY as text QA, never as drawing captions,
so inferring "the colour of grass" before drawing is something RL can unlock, not something
memorised. Benchmark prompts (shapes.benchmark) are never drawn.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tokenizers import Tokenizer

from shapes import chat
from shapes.benchmark import is_held_out
from shapes.facts import FACTS
from shapes.layout import sample_scene
from shapes.meaning import Meaning, describe, from_objects
from shapes.prompts import Prompt, generate
from shapes.questions import questions_for, truth
from shapes.scene import Scene, render
from shapes.tokenizer import turn_ids
from shapes.world import COLOUR_NAMES, SHAPES

TASKS: tuple[str, ...] = ("t2i", "t2i_think", "edit", "caption", "vqa", "fact_qa")
PLANS: tuple[str, ...] = ("restate", "commit")          # how a think-then-draw row writes its plan
NUMBER_ONE_FAMILIES = ("counting", "implicit_count")    # their plans say "one square", not "a square"
# drawing-caption families and their weights: the pretraining distribution's skew
DRAW_FAMILIES: dict[str, float] = {"single_object": 0.40, "colors": 0.20, "two_objects": 0.14,
                                   "color_attr": 0.12, "counting": 0.11, "position": 0.03}
RARE_COUNT_KEEP = 0.15          # a counting caption of 3 or 4 objects is kept with this probability


@dataclass(kw_only=True)
class TextPart:
    ids: list[int]               # one turn, without <|im_start|>/<|im_end|> (added when packed)
    target: bool = False         # trained with next-token cross-entropy


@dataclass(kw_only=True, eq=False)
class ImagePart:
    pixels: torch.Tensor         # (3, H, W) in [-1, 1]
    vae: bool = True             # clean latent block in the context (or the flow target if target)
    vit: bool = False            # SigLIP block in the context
    target: bool = False         # trained with the flow-matching loss (noised, hidden from later tokens)


@dataclass(kw_only=True)
class Example:
    task: str
    parts: list[TextPart | ImagePart] = field(default_factory=list)


def to_pixels(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _turn(tok: Tokenizer, role: str, text: str, *, target: bool = False) -> TextPart:
    return TextPart(ids=turn_ids(tok, role, text), target=target)


def draw_prompt(rng: random.Random, *, canvas_size: int):
    """A training drawing prompt: family by the skewed weights, benchmark texts redrawn."""
    families, weights = zip(*DRAW_FAMILIES.items())
    while True:
        p = generate(rng.choices(families, weights)[0], rng, canvas_size=canvas_size)
        if p.family == "counting" and p.meaning.objects[0].count >= 3 and rng.random() > RARE_COUNT_KEEP:
            continue
        if not is_held_out(p.text, family=p.family, canvas_size=canvas_size):
            return p


def scene_caption(scene: Scene) -> str:
    specs, _ = from_objects(scene.objects)
    return describe(Meaning(objects=specs))


def committed_meaning(meaning: Meaning, scene: Scene) -> Meaning:
    """`meaning` with each colourless spec given the colour its objects were drawn in, when they all
    share one (a spec whose objects differ in colour stays colourless). Scene objects come in spec order."""
    drawn = iter(scene.objects)
    specs = []
    for spec in meaning.objects:
        colours = {next(drawn).colour for _ in range(spec.count)}
        specs.append(replace(spec, colour=colours.pop()) if spec.colour is None and len(colours) == 1 else spec)
    return replace(meaning, objects=tuple(specs))


def plan_text(p: Prompt, scene: Scene, plans: str) -> str:
    """The plan of a think-then-draw row. "restate": the prompt made explicit (`p.explicit_text`);
    "commit": also the details the prompt leaves open and the drawing fixes (the colours), so that
    what the plan says is what gets drawn and an open choice in the plan is an open choice in the
    image: the distribution RL explores when it writes a plan."""
    if plans == "restate":
        return p.explicit_text
    if plans == "commit":
        return describe(committed_meaning(p.meaning, scene), number_one=p.family in NUMBER_ONE_FAMILIES)
    raise ValueError(f"plans={plans!r}: not one of {PLANS}")


def make_example(task: str, rng: random.Random, tok: Tokenizer, *, canvas_size: int,
                 cfg_dropout: float = 0.1, plans: str = "restate") -> Example:
    """One pretraining example of `task`; `cfg_dropout` drops the conditioning text of drawings;
    `plans` is how think-then-draw rows write their plan (`plan_text`)."""
    if task in ("t2i", "t2i_think"):
        p = draw_prompt(rng, canvas_size=canvas_size)
        scene = sample_scene(p.meaning, rng, canvas_size=canvas_size)
        image = ImagePart(pixels=to_pixels(render(scene)), target=True)
        drop = rng.random() < cfg_dropout
        if task == "t2i":
            return Example(task=task, parts=([] if drop else [_turn(tok, "user", p.text)]) + [image])
        system = _turn(tok, "system", chat.SYSTEM_THINK)
        if drop:    # text-CFG context of think mode: the system prompt alone
            return Example(task=task, parts=[system, image])
        return Example(task=task, parts=[system, _turn(tok, "user", p.text),
                                         _turn(tok, "assistant", chat.think_text(plan_text(p, scene, plans)),
                                               target=True),
                                         image])
    if task == "edit":
        while True:
            p = generate("edit", rng, canvas_size=canvas_size)
            try:
                target = sample_scene(p.meaning, rng, canvas_size=canvas_size)
                break
            except RuntimeError:
                continue
        src = ImagePart(pixels=to_pixels(render(p.meaning.source)), vae=True, vit=True)
        out = ImagePart(pixels=to_pixels(render(target)), target=True)
        r = rng.random()
        if r < cfg_dropout / 2:       # image-CFG context: the instruction alone
            return Example(task=task, parts=[_turn(tok, "user", p.text), out])
        if r < cfg_dropout:           # text-CFG context: the source image alone
            return Example(task=task, parts=[src, out])
        return Example(task=task, parts=[src, _turn(tok, "user", p.text), out])
    if task in ("caption", "vqa"):
        p = draw_prompt(rng, canvas_size=canvas_size)
        scene = sample_scene(p.meaning, rng, canvas_size=canvas_size)
        image = ImagePart(pixels=to_pixels(render(scene)), vae=False, vit=True)
        if task == "caption":
            return Example(task=task, parts=[image, _turn(tok, "user", chat.CAPTION_QUESTION),
                                             _turn(tok, "assistant", scene_caption(scene), target=True)])
        question = _vqa_question(scene, p.meaning, rng)
        answer = "yes" if truth(scene, question) else "no"
        return Example(task=task, parts=[image, _turn(tok, "user", f"{question.text} {chat.ANSWER_STYLE}"),
                                         _turn(tok, "assistant", answer, target=True)])
    if task == "fact_qa":
        fact = rng.choice(FACTS)
        return Example(task=task, parts=[_turn(tok, "user", fact.question),
                                         _turn(tok, "assistant", fact.answer, target=True)])
    raise ValueError(f"make_example: task={task!r} is not one of {TASKS}")


def _vqa_question(scene: Scene, meaning: Meaning, rng: random.Random):
    """Half true questions about the scene, half perturbed (other colour / shape / count)."""
    from dataclasses import replace
    q = rng.choice(questions_for(meaning))
    if rng.random() < 0.5:
        if q.kind == "count":
            q = replace(q, n=rng.choice([n for n in range(0, 5) if n != q.n]))
        elif q.colour is not None:
            q = replace(q, colour=rng.choice([c for c in COLOUR_NAMES if c != q.colour]))
        else:
            q = replace(q, shape=rng.choice([s for s in SHAPES if s != q.shape]))
    return q
