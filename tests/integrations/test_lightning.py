"""SophiaG in ``lightning.Trainer``: the callback against the real Trainer, tiny token model."""

from __future__ import annotations

from typing import Any

import pytest

L = pytest.importorskip("lightning", reason="the [lightning] extra is not installed")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from sophia.integrations.lightning import SophiaGCallback, next_token_mask  # noqa: E402
from sophia.torch import HessianNotRefreshedWarning, SophiaG  # noqa: E402

VOCAB, SEQ, N_SEQ, MICRO, SEED = 32, 8, 8, 2, 123
SOPHIA = {"lr": 1e-2, "rho": 0.05, "weight_decay": 0.1}


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (N_SEQ, SEQ + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[::2, -3:] = -100  # every other sequence ends in 3 positions outside the loss
    return [{"x": x[i], "y": y[i]} for i in range(N_SEQ)]


def loader() -> DataLoader:
    return DataLoader(dataset(), batch_size=MICRO)  # in order: the hand loop replays it


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB))


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)


class TinyLM(L.LightningModule):
    def __init__(self, direct: bool = False, optimizer: str = "sophia") -> None:
        super().__init__()
        self.net = tiny_net()
        self.direct = direct
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["x"]) if self.direct else self(batch["x"])
        return loss_of(logits, batch["y"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", loss_of(self(batch["x"]), batch["y"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters())
        return SophiaG(self.parameters(), **SOPHIA)


def trainer(**kw: Any) -> L.Trainer:
    base: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    base.update(kw)
    return L.Trainer(**base)


def spy(module: TinyLM) -> list[dict[str, Any]]:
    """Records (global step, forward number, mask) of each refresh the SophiaG receives."""
    calls: list[dict[str, Any]] = []
    forwards = [0]
    module.register_forward_pre_hook(lambda m, a: forwards.__setitem__(0, forwards[0] + 1))
    real = module.configure_optimizers

    def configure_optimizers() -> torch.optim.Optimizer:
        opt = real()
        inner = opt.update_hessian

        def update_hessian(**kw: Any) -> None:
            mask = kw.get("mask")
            step = module.trainer.global_step
            calls.append({"step": step, "forward": forwards[0], "mask": mask})
            inner(**kw)

        opt.update_hessian = update_hessian  # type: ignore[method-assign]
        return opt

    module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]
    return calls


def state_of(net: nn.Module, opt: SophiaG) -> list[torch.Tensor]:
    out = []
    for p in net.parameters():
        out += [p.detach(), opt.state[p]["exp_avg"], opt.state[p]["hessian"]]
    return out


def hand_loop(steps: int, k: int, accumulation: int) -> tuple[nn.Module, SophiaG]:
    """What the callback should amount to, written out: first micro-batch of steps 0, k, 2k..."""
    net = tiny_net()
    opt = SophiaG(net.parameters(), **SOPHIA)
    gen = torch.Generator().manual_seed(SEED)
    batches = iter([b for _ in range(steps * accumulation) for b in loader()])
    for t in range(steps):
        for j in range(accumulation):
            batch = next(batches)
            logits = net(batch["x"])
            if j == 0 and t % k == 0:
                opt.update_hessian(logits=logits, mask=batch["y"] != -100, generator=gen)
            # Lightning divides the loss by accumulate_grad_batches
            (loss_of(logits, batch["y"]) / accumulation).backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def mask_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["y"] != -100


def assert_bit_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {i} differs: max |diff| {(x - y).abs().max()}"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_refresh_schedule_matches_a_hand_written_loop(accumulation):
    k, steps = 3, 7
    module = TinyLM()
    calls = spy(module)
    callback = SophiaGCallback(hessian_update_interval=k, mask_fn=mask_fn, seed=SEED)
    # a validation loop (sanity check and mid-epoch) runs forwards while the hook is attached
    fit = trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulation,
        callbacks=[callback],
        num_sanity_val_steps=1,
        val_check_interval=4,
        limit_val_batches=1,
    )
    fit.fit(module, loader(), loader())
    due = [t for t in range(steps) if t % k == 0]
    assert [c["step"] for c in calls] == due
    # the refreshing forward is the first micro-batch of the step (1 sanity-check forward first)
    assert [c["forward"] - 1 for c in calls] == [
        t * accumulation + 1 + (t * accumulation) // 4 for t in due
    ]
    assert callback.num_refreshes == len(due) and callback.last_refresh_step == due[-1]
    opt = fit.optimizers[0]
    assert all(float(opt.state[p]["hessian"].sum()) > 0 for p in module.net.parameters())
    net, hand_opt = hand_loop(steps, k, accumulation)
    assert_bit_identical(state_of(module.net, opt), state_of(net, hand_opt))


def test_mask_and_bf16_autocast():
    module = TinyLM()
    calls = spy(module)
    callback = SophiaGCallback(hessian_update_interval=2, mask_fn=mask_fn, seed=SEED)
    trainer(max_steps=3, precision="bf16-mixed", callbacks=[callback]).fit(module, loader())
    ys = [b["y"] for b in loader()]
    assert [c["step"] for c in calls] == [0, 2]
    for c in calls:
        assert torch.equal(c["mask"], ys[c["step"]] != -100)
        assert not c["mask"].all()  # the batch has positions outside the loss
    for p in module.net.parameters():
        h = module.trainer.optimizers[0].state[p]["hessian"]
        assert bool(torch.isfinite(h).all()) and float(h.sum()) > 0


def test_resume_from_checkpoint_continues_bit_identically(tmp_path):
    """Resume at step 4 (k=3): the next refresh is at step 6; the run is the uninterrupted one."""
    k = 3
    full = TinyLM()
    saver = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}"
    )
    fit = trainer(
        max_steps=8,
        enable_checkpointing=True,
        callbacks=[SophiaGCallback(k, mask_fn=mask_fn, seed=SEED), saver],
    )
    fit.fit(full, loader())
    ckpt = tmp_path / "step=4.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in tmp_path.iterdir())

    resumed = TinyLM()
    calls = spy(resumed)
    fit_b = trainer(max_steps=8, callbacks=[SophiaGCallback(k, mask_fn=mask_fn, seed=SEED)])
    fit_b.fit(resumed, loader(), ckpt_path=str(ckpt))
    assert [c["step"] for c in calls] == [6]
    assert_bit_identical(
        state_of(resumed.net, fit_b.optimizers[0]), state_of(full.net, fit.optimizers[0])
    )
    net, hand_opt = hand_loop(8, k, 1)
    assert_bit_identical(state_of(full.net, fit.optimizers[0]), state_of(net, hand_opt))


def test_a_submodule_called_directly_needs_module_name():
    module = TinyLM(direct=True)  # training_step calls self.net(...), not self(...)
    with pytest.raises(RuntimeError, match=r"no forward of TinyLM ran.*point the callback"):
        trainer(max_steps=1, callbacks=[SophiaGCallback()]).fit(module, loader())
    module = TinyLM(direct=True)
    calls = spy(module)
    callback = SophiaGCallback(2, module="net", seed=SEED)
    trainer(max_steps=3, callbacks=[callback]).fit(module, loader())
    assert [c["step"] for c in calls] == [0, 2] and calls[0]["mask"] is None
    with pytest.raises(ValueError, match=r"Invalid module: 'nett' is not a submodule of TinyLM"):
        trainer(max_steps=1, callbacks=[SophiaGCallback(module="nett")]).fit(TinyLM(), loader())


class NaiveRefresh(L.Callback):
    """The refresh placed where it looks natural, after Lightning's backward."""

    def on_before_optimizer_step(self, trainer: L.Trainer, module: Any, optimizer: Any) -> None:
        optimizer.update_hessian(logits=module.last_logits)


class KeepsLogits(TinyLM):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.last_logits = self(batch["x"])
        return loss_of(self.last_logits, batch["y"])


def test_the_traps_without_the_callback():
    module = TinyLM()
    with pytest.warns(HessianNotRefreshedWarning, match="lightning.SophiaGCallback"):
        trainer(max_steps=20).fit(module, loader())
    opt = module.trainer.optimizers[0]
    assert all(float(opt.state[p]["hessian"].abs().sum()) == 0 for p in module.parameters())
    with pytest.raises(RuntimeError, match="already freed by a backward.*before loss.backward"):
        trainer(max_steps=1, callbacks=[NaiveRefresh()]).fit(KeepsLogits(), loader())


def test_default_seed_follows_seed_everything():
    states = []
    for seed in (7, 7, 8):
        module = TinyLM()  # seeds torch itself: seed_everything comes after
        L.seed_everything(seed, verbose=False)
        callback = SophiaGCallback(1)
        trainer(max_steps=2, callbacks=[callback]).fit(module, loader())
        states.append(callback.state_dict()["generator_state"])
    assert torch.equal(states[0], states[1])
    assert not torch.equal(states[0], states[2])


class TwoSophiaG(TinyLM):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False  # Lightning's rule for several optimizers

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [SophiaG(self.net[0].parameters()), SophiaG(self.net[1].parameters())]


def test_errors():
    with pytest.raises(TypeError, match=r"SophiaG, but the trainer's optimizers are AdamW"):
        trainer(max_steps=1, callbacks=[SophiaGCallback()]).fit(TinyLM(optimizer="adamw"), loader())
    with pytest.raises(ValueError, match=r"returned 2 SophiaG optimizers.*one SophiaG"):
        trainer(max_steps=1, callbacks=[SophiaGCallback()]).fit(TwoSophiaG(), loader())
    bad_mask = SophiaGCallback(mask_fn=lambda batch: batch["y"][:, 1:] != -100)
    with pytest.raises(ValueError, match=r"mask_fn\(batch\).*shape \(2, 7\)"):
        trainer(max_steps=1, callbacks=[bad_mask]).fit(TinyLM(), loader())
    for bad in (0, 1.5, False):
        with pytest.raises(ValueError, match="Invalid hessian_update_interval"):
            SophiaGCallback(bad)  # type: ignore[arg-type]
    # a refresh's output must carry logits
    out = {"loss": torch.zeros(())}
    from sophia.integrations._torch import extract_logits

    with pytest.raises(ValueError, match=r"has no logits: got dict \(keys: \['loss'\]\)"):
        extract_logits(out, "SophiaGCallback", "TinyLM")
    assert extract_logits({"logits": out["loss"]}, "x", "y") is out["loss"]


def test_next_token_mask():
    valid = torch.tensor([[True, True, False, True]])
    assert torch.equal(next_token_mask(valid), torch.tensor([[True, False, True, False]]))
