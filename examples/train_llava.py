"""Train a small LLaVA on synthetic shape scenes in LLaVA's two stages, then answer held-out questions.

    python examples/train_llava.py                          # one process: minutes on a CPU
    torchrun --nproc_per_node 2 examples/train_llava.py     # data-parallel (gloo on CPUs, nccl on GPUs)

The vision tower is the CLIP image tower that examples/train_clip.py trains (trained here first, or
read with --clip from a file written by --save-clip). Stage 1 trains only the projector on captions
("<image>" -> "a picture of a small red circle and ..."); stage 2 trains the projector and a small
LLaMA on instructions about the scenes (examples/shapes_scenes.py): short questions, detailed
descriptions, relations. The loss is on the answers only (vlfast.models.llava_chat). Afterwards the
model answers held-out questions by greedy generation with the KV cache; the accuracy per kind of
question is reported beside chance (always giving the answer seen most often in training for that
question). Writes a loss-curve plot (--plot).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import train_clip
from shapes_scenes import KINDS, context, instructions, make_scenes, vocabulary
from vlfast.models import LLaVA, LlamaConfig, LlavaConfig
from vlfast.models.llava_chat import encode_conversation, pad_batch

SYSTEM = "a chat about a picture ."
SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:"]
MODELS = {"example": {"hidden": 96, "layers": 3, "heads": 4}, "tiny": {"hidden": 32, "layers": 1, "heads": 2}}


class Words:
    """Word tokenizer over the scenes' closed vocabulary (and the template's words)."""

    def __init__(self):
        self.vocab = SPECIALS + sorted(set(vocabulary()) | set(SYSTEM.split()))
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def __call__(self, text: str) -> list:
        return [self.ids[w] for w in text.split()]

    def conversation(self, turns, tokens_per_image: int) -> tuple:
        """(input_ids, labels) of LLaVA-1.5's template for these (question, answer) turns."""
        return encode_conversation(turns, self, image_token_index=self.ids["<image>"],
                                   tokens_per_image=tokens_per_image, eos_token_id=self.ids["</s>"],
                                   bos_token_id=self.ids["<s>"], system=SYSTEM)

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids if self.vocab[i] not in SPECIALS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="example")
    p.add_argument("--clip", help="a vlfast CLIP state dict (safetensors) from --save-clip; default: train one")
    p.add_argument("--save-clip", help="write the CLIP this run trains here (safetensors)")
    p.add_argument("--clip-steps", type=int, default=300)
    p.add_argument("--clip-train-size", type=int, default=20000)
    p.add_argument("--stage1-steps", type=int, default=300)
    p.add_argument("--stage2-steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split evenly over the ranks")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-scenes", type=int, default=4000)
    p.add_argument("--eval-scenes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plot", default="train_llava_loss.png", help="loss-curve PNG ('' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("stage1_steps", "stage2_steps", "batch_size", "train_scenes", "eval_scenes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def vision_tower(args, device) -> tuple:
    """(CLIPConfig, CLIP) whose image tower LLaVA reads: from --clip, or trained here by train_clip."""
    from vlfast.models import CLIP
    tokenizer = train_clip.WordTokenizer()
    config = train_clip.model_config("example" if args.model == "example" else "tiny", 32, tokenizer)
    if args.clip:
        from safetensors.torch import load_file
        clip = CLIP(config)
        clip.load_state_dict(load_file(args.clip))
        return config, clip.to(device)
    quiet = ["--quiet"] if args.quiet else []
    result = train_clip.main(["--model", "example" if args.model == "example" else "tiny", "--steps",
                              str(args.clip_steps), "--train-size", str(args.clip_train_size), "--eval-size", "500",
                              "--plot", "", "--device", args.device, *quiet])
    clip = result["model"]
    if args.save_clip:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, args.save_clip)
    return config, clip


def build(args, tokens: Words, device) -> LLaVA:
    clip_config, clip = vision_tower(args, device)
    m = MODELS[args.model]
    text = LlamaConfig(vocab_size=len(tokens.vocab), hidden_size=m["hidden"], intermediate_size=4 * m["hidden"],
                       num_layers=m["layers"], num_heads=m["heads"], max_position_embeddings=256)
    config = LlavaConfig(vision=clip_config.vision, text=text, image_token_index=tokens.ids["<image>"],
                         vision_feature_layer=-2)
    torch.manual_seed(args.seed)  # every rank starts from the same weights
    model = LLaVA(config).to(device)
    tower = {k: v for k, v in clip.visual.state_dict().items() if not k.startswith("proj.")}
    model.vision_tower.load_state_dict(tower, strict=False)
    return model


def examples(scenes, tokens: Words, stage: int, seed: int, tokens_per_image: int) -> list:
    """(scene index, input_ids, labels): captions for stage 1, instructions for stage 2."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, scene in enumerate(scenes.objects):
        if stage == 1:
            turns = [[("<image>", context(scene).split(".")[0] + " .")]]
        else:
            turns = [[(f"<image>\n{q}", a)] for _, q, a in instructions(scene, g)]
        for conversation in turns:
            out.append((i, *tokens.conversation(conversation, tokens_per_image)))
    return out


def train_stage(model, ddp, data, images, stage: int, steps: int, args, rank: int, world: int, device) -> list:
    model.set_training_stage(stage)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
    local = args.batch_size // world
    g = torch.Generator().manual_seed(args.seed + stage)
    order = torch.cat([torch.randperm(len(data), generator=g) for _ in range(steps * args.batch_size // len(data) + 1)])
    bar = tqdm(total=steps, desc=f"stage {stage}", unit="step", file=sys.stderr, disable=rank != 0 or args.quiet,
               mininterval=0.5, dynamic_ncols=True)
    def loss_of(step: int):
        batch = order[step * args.batch_size:(step + 1) * args.batch_size][rank * local:(rank + 1) * local]
        chosen = [data[int(j)] for j in batch]
        padded = pad_batch([(ids, labels) for _, ids, labels in chosen], pad_token_id=0)
        pixels = images[torch.tensor([i for i, _, _ in chosen])].to(device)
        return ddp(padded["input_ids"].to(device), padded["labels"].to(device), pixels,
                   padded["attention_mask"].to(device))

    return train_clip.optimise(loss_of, range(steps), opt, sched, world, bar)


class LossModule(torch.nn.Module):
    """LLaVA.loss as a forward, for DistributedDataParallel."""

    def __init__(self, model: LLaVA):
        super().__init__()
        self.model = model

    def forward(self, ids, labels, pixels, mask):
        return self.model.loss(ids, labels, pixels, attention_mask=mask)


@torch.no_grad()
def evaluate(model: LLaVA, scenes, tokens: Words, train_answers: dict, seed: int, device) -> dict:
    """{kind: (accuracy, chance, count)}: exact answers by greedy generation; chance answers every question
    with the answer its template got most often in training. "conclusion": the reasoning answers' last
    word alone (yes / no), against the most frequent last word."""
    g = torch.Generator().manual_seed(seed)
    right, chance, count = Counter(), Counter(), Counter()
    model.eval()
    for i, scene in enumerate(scenes.objects):
        for kind, question, answer in instructions(scene, g):
            prompt, _ = tokens.conversation([(f"<image>\n{question}", "")], model.config.tokens_per_image)
            prompt = prompt[:-1]  # the prompt ends at "ASSISTANT:" (the empty answer's </s> removed)
            out, length = model.generate(scenes.images[i:i + 1].to(device), prompt[None].to(device), 32,
                                         stop_tokens=[tokens.ids["</s>"]])
            said = tokens.decode(out[0, :int(length[0])].tolist())
            seen = train_answers.get(_template(question), Counter())
            scored = [(kind, said, answer, seen)]
            if kind == "reasoning":  # its conclusion alone: the last word, yes or no
                last_words = Counter()
                for a, c in seen.items():
                    last_words[a.split()[-1]] += c
                scored.append(("conclusion", said.split()[-1] if said else "", answer.split()[-1], last_words))
            for name, got, want, counts in scored:
                right[name] += got == want
                chance[name] += bool(counts) and counts.most_common(1)[0][0] == want
                count[name] += 1
    return {k: (right[k] / count[k], chance[k] / count[k], count[k]) for k in (*KINDS, "conclusion") if count[k]}


def _template(question: str) -> str:
    """The question with its scene-specific words blanked: the key for the most frequent answer."""
    words = set(vocabulary()) - {"where", "is", "the", "how", "many", "shapes", "are", "there", "?", "what",
                                 "colour", "shape", "one", "describe", "picture", "in", "detail", ".", "left",
                                 "of", "above"}
    return " ".join("_" if w in words else w for w in question.split())


def main(argv=None) -> dict:
    """Trains both stages and evaluates; returns {"losses", "accuracy", "seconds", "model"}."""
    args = parse_args(argv)
    rank, world, owns_group, device = train_clip.start(args.batch_size, args.device)
    t0 = time.perf_counter()
    tokens = Words()
    model = build(args, tokens, device)
    train = make_scenes(args.train_scenes, 32, seed=args.seed + 10)
    held_out = make_scenes(args.eval_scenes, 32, seed=args.seed + 11)
    ddp = LossModule(model)
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(ddp, find_unused_parameters=True)
    losses = {}
    for stage, steps in ((1, args.stage1_steps), (2, args.stage2_steps)):
        data = examples(train, tokens, stage, args.seed, model.config.tokens_per_image)
        losses[stage] = train_stage(model, ddp, data, train.images, stage, steps, args, rank, world, device)
    answers = defaultdict(Counter)
    g = torch.Generator().manual_seed(args.seed)
    for scene in train.objects:
        for _, question, answer in instructions(scene, g):
            answers[_template(question)][answer] += 1
    accuracy = evaluate(model, held_out, tokens, answers, args.seed + 12, device) if rank == 0 else {}
    seconds = time.perf_counter() - t0
    if rank == 0:
        for kind, (acc, chance, count) in accuracy.items():
            print(f"{kind:13s} {acc:6.1%} exact answers on {count} held-out questions (chance {chance:.1%})")
        print(f"{seconds:.0f} s in all")
        if args.plot:
            print(train_clip.plot_losses(losses[1] + losses[2], args.plot, "LLaVA (stage 1, then 2)",
                                         marks=(len(losses[1]),)))
    if owns_group:
        dist.destroy_process_group()
    return {"losses": losses, "accuracy": accuracy, "seconds": seconds, "model": model}


if __name__ == "__main__":
    main()
