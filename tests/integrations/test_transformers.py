"""SophiaG in Hugging Face ``Trainer``: the callback against the real Trainer, on a tiny GPT-2.

Nothing is downloaded: the model is built from a config and fed random token ids,
some sequences padded (attention mask 0, labels -100 at their end).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip(
    "transformers", reason="the [transformers] extra is not installed"
)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from sophia.integrations.transformers import (  # noqa: E402
    SophiaGCallback,
    is_causal_lm,
    next_token_mask,
    sophia_trainer_optimizer,
)
from sophia.torch import HessianNotRefreshedWarning, SophiaG, SophiaGWarning  # noqa: E402

VOCAB, SEQ, N_SEQ, MICRO = 128, 16, 24, 4
SOPHIA = {"lr": 1e-3, "rho": 0.05, "weight_decay": 0.1}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (N_SEQ, SEQ), generator=g)
    attention = torch.ones_like(ids)
    attention[::3, -5:] = 0  # every third sequence ends in 5 padding tokens
    labels = torch.where(attention.bool(), ids, -100)
    return [
        {"input_ids": ids[i], "attention_mask": attention[i], "labels": labels[i]}
        for i in range(N_SEQ)
    ]


def training_args(out: str, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = {
        "output_dir": out,
        "per_device_train_batch_size": MICRO,
        "max_steps": 7,
        "learning_rate": SOPHIA["lr"],
        "lr_scheduler_type": "constant",
        "report_to": [],
        "logging_strategy": "no",
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        # batches in dataset order: the hand-written loop below replays them
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
    }
    base.update(kw)
    return TrainingArguments(**base)


class Spy:
    """Records each refresh the optimizer receives (step, micro-batch, mask) and forwards it."""

    def __init__(self, opt: SophiaG, model: nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.forwards = 0
        self.trainer: Trainer | None = None
        real = opt.update_hessian

        def update_hessian(**kw: Any) -> None:
            assert self.trainer is not None
            self.calls.append(
                {
                    "step": self.trainer.state.global_step,
                    "forward": self.forwards,
                    "mask": None if kw.get("mask") is None else kw["mask"].clone(),
                    "logits_shape": tuple(kw["logits"].shape),
                }
            )
            real(**kw)

        def count(module: nn.Module, args: Any) -> None:
            self.forwards += 1

        def autocast(module: nn.Module, args: Any, output: Any) -> None:
            self.autocast.append(torch.is_autocast_enabled("cpu"))

        opt.update_hessian = update_hessian  # type: ignore[method-assign]
        # registered before the callback's hook: counts the forward that is refreshing
        model.register_forward_pre_hook(count)
        self.autocast: list[bool] = []  # per forward: did the logits come from bf16 autocast?
        model.lm_head.register_forward_hook(autocast)


def epochs(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Batches epoch after epoch; each new iterator draws its base seed, as Trainer's do."""
    while True:
        yield from loader


def run_trainer(out: str, k: int = 3, resume: str | None = None, **kw: Any):
    model = tiny_gpt2()
    args = training_args(out, **kw)
    opt = SophiaG(model.parameters(), **SOPHIA)
    spy = Spy(opt, model)
    callback = SophiaGCallback(hessian_update_interval=k)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        optimizers=(opt, None),
        callbacks=[callback],
    )
    spy.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return model, opt, spy, callback, trainer


def params_and_state(model: nn.Module, opt: SophiaG) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        out += [p.detach(), opt.state[p]["exp_avg"], opt.state[p]["hessian"]]
    return out


def assert_bit_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {i} differs: max |diff| {(x - y).abs().max()}"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_refresh_schedule_matches_a_hand_written_loop(tmp_path, accumulation):
    """Steps 0, k, 2k... refresh once, on the first micro-batch, bit-identical to a hand loop."""
    k, steps = 3, 7
    model, opt, spy, callback, trainer = run_trainer(
        str(tmp_path), k=k, max_steps=steps, gradient_accumulation_steps=accumulation
    )
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"  # reached through .optimizer
    due = [t for t in range(steps) if t % k == 0]
    assert [c["step"] for c in spy.calls] == due
    # the first micro-batch of step t is forward number t * accumulation + 1
    assert [c["forward"] for c in spy.calls] == [t * accumulation + 1 for t in due]
    assert callback.num_refreshes == len(due) and callback.last_refresh_step == due[-1]
    for p in model.parameters():
        h = opt.state[p]["hessian"]
        assert bool(torch.isfinite(h).all())
    assert all(float(opt.state[p]["hessian"].sum()) > 0 for p in model.parameters())

    # the same run by hand: the same batches and seed, the one refresh rule
    hand = tiny_gpt2()
    hand.train()
    hand_opt = SophiaG(hand.parameters(), **SOPHIA)
    torch.manual_seed(trainer.args.seed)
    micro_batches = epochs(DataLoader(dataset(), batch_size=MICRO))
    for t in range(steps):
        micro = [next(micro_batches) for _ in range(accumulation)]
        n_items = sum(int((b["labels"] != -100).sum()) for b in micro)
        for j, inputs in enumerate(micro):
            out = hand(**inputs, num_items_in_batch=torch.tensor(n_items))
            if j == 0 and t % k == 0:
                mask = next_token_mask(inputs["labels"] != -100)
                hand_opt.update_hessian(logits=out.logits, mask=mask)
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hand.parameters(), trainer.args.max_grad_norm)
        hand_opt.step()
        hand.zero_grad()
    assert_bit_identical(params_and_state(model, opt), params_and_state(hand, hand_opt))


def test_padding_and_the_causal_shift_are_masked(tmp_path):
    """The mask is that of the loss: label i+1 for logits i, nothing at padding or the end."""
    model, opt, spy, _, _ = run_trainer(str(tmp_path), k=2, max_steps=3)
    labels = torch.stack([b["labels"] for b in dataset()])
    for call in spy.calls:
        t = call["step"]
        batch_labels = labels[t * MICRO : (t + 1) * MICRO]
        mask = call["mask"]
        assert mask.dtype == torch.bool and mask.shape == (MICRO, SEQ)
        assert call["logits_shape"] == (MICRO, SEQ, VOCAB)
        expected = torch.zeros(MICRO, SEQ, dtype=torch.bool)
        expected[:, :-1] = batch_labels[:, 1:] != -100
        assert torch.equal(mask, expected)
        assert not mask[:, -1].any()
        padded = batch_labels == -100
        assert padded.any()  # the batch does pad
        # no position whose next token is padding is sampled
        assert not (mask[:, :-1] & padded[:, 1:]).any()
    # bs=None: SophiaG's bs is the label count of the latest refresh, the masked-in positions
    first = next(model.parameters())
    assert int(opt.state[first]["group_label_count"]) == int(spy.calls[-1]["mask"].sum())


def test_resume_from_checkpoint_continues_bit_identically(tmp_path):
    """Resuming at step 4 (k=3) refreshes next at step 6, as the uninterrupted run does."""
    k, steps = 3, 8
    full = run_trainer(
        str(tmp_path / "a"), k=k, max_steps=steps, save_strategy="steps", save_steps=4
    )
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert ckpt.is_dir()
    model, opt, spy, callback, _ = run_trainer(
        str(tmp_path / "b"), k=k, max_steps=steps, resume=str(ckpt)
    )
    assert [c["step"] for c in spy.calls] == [6]
    assert callback.last_refresh_step == 6
    assert_bit_identical(params_and_state(model, opt), params_and_state(full[0], full[1]))


def test_bf16_autocast_runs(tmp_path):
    model, opt, spy, callback, _ = run_trainer(str(tmp_path), k=2, max_steps=3, bf16=True)
    assert spy.autocast == [True] * 3  # Trainer ran the forwards under CPU bf16 autocast
    assert [c["step"] for c in spy.calls] == [0, 2]
    for p in model.parameters():
        h = opt.state[p]["hessian"]
        assert h.dtype == p.dtype and bool(torch.isfinite(h).all())
    assert all(float(opt.state[p]["hessian"].sum()) > 0 for p in model.parameters())


def test_evaluation_and_no_grad_forwards_never_refresh(tmp_path):
    model = tiny_gpt2()
    opt = SophiaG(model.parameters(), **SOPHIA)
    calls = []
    real = opt.update_hessian
    opt.update_hessian = lambda **kw: (calls.append(kw), real(**kw))  # type: ignore[method-assign]
    callback = SophiaGCallback(hessian_update_interval=2)
    args, state, control = training_args(str(tmp_path)), TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=model, optimizer=opt)
    batch = {k: torch.stack([b[k] for b in dataset()[:2]]) for k in ("input_ids", "labels")}
    callback.on_step_begin(args, state, control)  # global_step 0: due
    model.eval()
    model(**batch)
    model.train()
    with torch.no_grad():
        model(**batch)
    assert calls == []
    model(**batch)
    model(**batch)  # a second micro-batch of the same step
    assert len(calls) == 1
    callback.on_pre_optimizer_step(args, state, control)
    state.global_step = 1
    callback.on_step_begin(args, state, control)  # not due
    model(**batch)
    assert len(calls) == 1
    callback.on_train_end(args, state, control)
    state.global_step = 2
    callback.on_step_begin(args, state, control)
    model(**batch)  # the hook is gone after training
    assert len(calls) == 1


def test_trainer_without_the_callback_warns_naming_it(tmp_path):
    """The trap itself: Trainer only calls step(), so h stays 0; SophiaG says what to add."""
    model = tiny_gpt2()
    opt = SophiaG(model.parameters(), **SOPHIA)
    trainer = Trainer(
        model=model,
        args=training_args(str(tmp_path), max_steps=20, per_device_train_batch_size=1),
        train_dataset=dataset(),
        optimizers=(opt, None),
    )
    with pytest.warns(HessianNotRefreshedWarning, match="transformers.SophiaGCallback"):
        trainer.train()
    assert all(float(opt.state[p]["hessian"].abs().sum()) == 0 for p in model.parameters())


def test_a_due_refresh_without_a_training_forward_raises(tmp_path):
    model = tiny_gpt2()
    opt = SophiaG(model.parameters(), **SOPHIA)
    callback = SophiaGCallback(hessian_update_interval=2)
    args, state, control = training_args(str(tmp_path)), TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=model, optimizer=opt)
    callback.on_step_begin(args, state, control)
    with pytest.raises(RuntimeError, match="refresh due at optimizer step 0 .* no forward"):
        callback.on_pre_optimizer_step(args, state, control)


def test_an_optimizer_that_is_not_sophia_raises(tmp_path):
    model = tiny_gpt2()
    trainer = Trainer(
        model=model,
        args=training_args(str(tmp_path), max_steps=1),
        train_dataset=dataset(),
        callbacks=[SophiaGCallback()],
    )
    with pytest.raises(TypeError, match="SophiaG, but the trainer's optimizer is AdamW"):
        trainer.train()


class LossOnly(nn.Module):
    """A model whose output carries the loss but no logits."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = tiny_gpt2()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return {"loss": out.loss}


def test_outputs_without_logits_raise(tmp_path):
    model = LossOnly()
    trainer = Trainer(
        model=model,
        args=training_args(str(tmp_path), max_steps=1),
        train_dataset=dataset(),
        optimizers=(SophiaG(model.parameters(), **SOPHIA), None),
        callbacks=[SophiaGCallback()],
    )
    with pytest.raises(ValueError, match=r"output of LossOnly has no logits.*keys: \['loss'\]"):
        trainer.train()


def test_mask_rules_from_the_forward_inputs():
    """shift_labels as given; labels shifted for causal LMs, as they are for other models."""
    from sophia.integrations.transformers import _loss_mask

    logits = torch.zeros(2, 4, 3)
    labels = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, -100]])
    attention = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    causal, other = _loss_mask(True), _loss_mask(False)
    valid = labels != -100
    assert torch.equal(causal({"labels": labels}, logits), next_token_mask(valid))
    assert torch.equal(
        next_token_mask(valid), torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    )
    assert torch.equal(other({"labels": labels}, logits), valid)
    assert torch.equal(causal({"shift_labels": labels, "labels": labels}, logits), valid)
    assert torch.equal(causal({"attention_mask": attention}, logits), next_token_mask(attention))
    assert torch.equal(other({"attention_mask": attention}, logits), attention.bool())
    assert causal({"input_ids": labels}, logits) is None  # nothing known: every position
    # a sequence-classification attention mask does not describe [batch, classes] logits
    assert other({"attention_mask": attention}, torch.zeros(2, 3)) is None
    with pytest.raises(ValueError, match=r"has shape \(2, 4\) but the logits have shape \(2, 3"):
        other({"labels": labels}, torch.zeros(2, 3, 5))


def test_causal_detection_and_a_custom_mask(tmp_path):
    assert is_causal_lm(tiny_gpt2())
    assert not is_causal_lm(nn.Linear(2, 2))
    model = tiny_gpt2()
    opt = SophiaG(model.parameters(), **SOPHIA)
    seen = []
    real = opt.update_hessian
    opt.update_hessian = lambda **kw: (seen.append(kw["mask"]), real(**kw))  # type: ignore[method-assign]
    callback = SophiaGCallback(
        hessian_update_interval=1, mask_fn=lambda inputs, logits: inputs["attention_mask"] > 0
    )
    args, state, control = training_args(str(tmp_path)), TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=model, optimizer=opt)
    callback.on_step_begin(args, state, control)
    batch = {k: torch.stack([b[k] for b in dataset()[:3]]) for k in dataset()[0]}
    model(**batch)
    assert torch.equal(seen[0], batch["attention_mask"] > 0)
    bad = SophiaGCallback(mask_fn=lambda inputs, logits: inputs["attention_mask"][:, 1:] > 0)
    bad.on_train_begin(args, state, control, model=model, optimizer=opt)
    bad.on_step_begin(args, state, control)
    with pytest.raises(ValueError, match="mask_fn"):
        model(**batch)


def test_invalid_interval():
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="Invalid hessian_update_interval"):
            SophiaGCallback(hessian_update_interval=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- building the optimizer


def test_optimizer_cls_and_kwargs_losing_weight_decay_warns(tmp_path):
    model = tiny_gpt2()
    args = training_args(str(tmp_path), max_steps=1)  # args.weight_decay: 0.0
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        optimizer_cls_and_kwargs=(SophiaG, {"lr": 1e-3, "weight_decay": 0.2}),
        callbacks=[SophiaGCallback()],
    )
    trainer.create_optimizer()
    # the trap itself: every group got args.weight_decay or 0, never SophiaG's 0.2
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {0.0}
    with pytest.warns(SophiaGWarning, match=r"weight_decay=0.2.*sophia_trainer_optimizer"):
        SophiaGCallback().on_train_begin(
            args, TrainerState(), TrainerControl(), model=model, optimizer=trainer.optimizer
        )
    # built with sophia_trainer_optimizer, nothing to warn about
    opt = sophia_trainer_optimizer(model, args, weight_decay=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SophiaGCallback().on_train_begin(
            args, TrainerState(), TrainerControl(), model=model, optimizer=opt
        )


def test_sophia_trainer_optimizer_groups_like_trainer(tmp_path):
    model = tiny_gpt2()
    model.transformer.wpe.weight.requires_grad_(False)  # frozen parameters stay out
    args = training_args(str(tmp_path), weight_decay=0.05)
    reference = Trainer(model=model, args=args, train_dataset=dataset())
    adamw = reference.create_optimizer()
    opt = sophia_trainer_optimizer(model, args, rho=0.02, betas=(0.9, 0.95))

    def ids(group: dict[str, Any]) -> set[int]:
        return {id(p) for p in group["params"]}

    assert [ids(g) for g in opt.param_groups] == [ids(g) for g in adamw.param_groups]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    no_decay = {n for n, p in model.named_parameters() if id(p) in ids(opt.param_groups[1])}
    assert no_decay and all(("bias" in n or ".ln_" in n) for n in no_decay)
    assert id(model.transformer.wpe.weight) not in ids(opt.param_groups[0]) | ids(
        opt.param_groups[1]
    )
    for g in opt.param_groups:
        assert g["lr"] == args.learning_rate and g["rho"] == 0.02 and g["betas"] == (0.9, 0.95)


def test_sophia_trainer_optimizer_resolves_lr_and_weight_decay(tmp_path):
    model = tiny_gpt2()
    default_args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # nothing set anywhere: SophiaG's own defaults (not Trainer's 5e-5 and 0.0)
        opt = sophia_trainer_optimizer(model, default_args)
        assert opt.defaults["lr"] == SophiaG(model.parameters()).defaults["lr"]
        assert opt.defaults["weight_decay"] == SophiaG(model.parameters()).defaults["weight_decay"]
        # passed here wins silently over an args value that is Trainer's default
        opt = sophia_trainer_optimizer(model, default_args, lr=3e-4, weight_decay=0.2)
        assert (opt.defaults["lr"], opt.param_groups[0]["weight_decay"]) == (3e-4, 0.2)
    set_args = training_args(str(tmp_path), learning_rate=2e-3, weight_decay=0.3)
    opt = sophia_trainer_optimizer(model, set_args)  # set in args only: used
    assert (opt.defaults["lr"], opt.param_groups[0]["weight_decay"]) == (2e-3, 0.3)
    with pytest.warns(SophiaGWarning) as record:
        opt = sophia_trainer_optimizer(model, set_args, lr=1e-3, weight_decay=0.1)
    messages = " | ".join(str(w.message) for w in record)
    assert "args.learning_rate=0.002 is not used" in messages
    assert "args.weight_decay=0.3 is not used" in messages
    assert (opt.defaults["lr"], opt.param_groups[0]["weight_decay"]) == (1e-3, 0.1)
    adam_args = training_args(str(tmp_path), adam_beta2=0.95)
    with pytest.warns(SophiaGWarning, match=r"args.adam_beta2=0.95 is AdamW's.*betas="):
        sophia_trainer_optimizer(model, adam_args)
    with pytest.raises(TypeError, match="params="):
        sophia_trainer_optimizer(model, None, params=model.parameters())
