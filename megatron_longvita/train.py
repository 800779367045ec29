"""`torchrun ... -m megatron_longvita.train --config STAGE.yaml [Megatron-LM flags]`

One Long-VITA stage on megatron-core: the model provider named by the config, megatron DDP
+ (distributed) optimizer with the stage's freeze rules and vision learning-rate scaling,
cosine schedule, pipeline schedules, packed multimodal data, and atomic dist checkpoints
that resume exactly (``--load`` of the same run) or start the next stage (``--finetune``:
weights only, from a training checkpoint or a converted HF checkpoint).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, ParamKey

from megatron_longvita.checkpoint.dist import (
    latest_checkpoint_dir,
    load_model,
    load_training_checkpoint,
    save_training_checkpoint,
)
from megatron_longvita.checkpoint.model_config import has_model_config, load_model_config, save_model_config
from megatron_longvita.config.parallel import ConfigError
from megatron_longvita.config.tokens import CONTEXT_TOKENS
from megatron_longvita.config.train import TrainConfig, parse_args
from megatron_longvita.data import build_data_loader
from megatron_longvita.data.distribute import BroadcastLoader
from megatron_longvita.models.heads import HeadConfig
from megatron_longvita.models.long_vita import MODEL_PROVIDERS
from megatron_longvita.models.presets import ModelConfig, get_preset
from megatron_longvita.parallel import split_batch_for_context_parallel
from megatron_longvita.parallel.attention import packed_seq_params_for_context_parallel
from megatron_longvita.platform import Platform, destroy_distributed, initialize_distributed, setup_platform
from megatron_longvita.training.loop import (
    TrainState,
    build_model_chunks,
    is_logging_rank,
    masked_loss,
    setup_training,
    train_step,
)

logger = logging.getLogger("megatron_longvita.train")


def vision_lr_overrides(config: TrainConfig, model: ModelConfig) -> dict[ParamKey, dict]:
    """Stage 2's ViT learning rate: ``vision_lr_mult`` x ``vision_layer_decay`` ** depth-from-top.

    Depth counts from the last encoder layer (decay^0) down to the patch/position embeddings
    (decay^num_layers), as InternVL's layer-wise decay does; both peak and final LR scale.
    """
    optim = config.optimizer
    if optim.vision_lr_mult == 1.0 and optim.vision_layer_decay == 1.0:
        return {}
    layers = model.vision.num_layers

    def scaled(depth_from_top: int) -> dict:
        factor = optim.vision_lr_mult * optim.vision_layer_decay**depth_from_top
        return {"max_lr": optim.lr * factor, "min_lr": optim.min_lr * factor}

    embeddings = ("*vision.class_embedding", "*vision.patch_embedding.*", "*vision.position_embedding")
    overrides = {ParamKey(name=embeddings): scaled(layers)}
    for layer in range(layers):
        overrides[ParamKey(name=f"*vision.decoder.layers.{layer}.*")] = scaled(layers - 1 - layer)
    return overrides


def checkpoint_model_config(config: TrainConfig) -> Optional[str]:
    """The checkpoint whose weights this run starts from (as `_restore` picks it), if any."""
    ckpt = config.checkpoint
    if ckpt.save and latest_checkpoint_dir(ckpt.save) is not None:
        return latest_checkpoint_dir(ckpt.save)
    if ckpt.load:
        source = latest_checkpoint_dir(ckpt.load) or ckpt.load
        if not has_model_config(source):
            raise ConfigError(
                f"--load {ckpt.load}: {source} has no model config; load a checkpoint written by hf2mcore or by train"
            )
        return source
    return None


def resolve_model(config: TrainConfig, tokenizer) -> ModelConfig:
    """The model of the checkpoint the run starts from, else the preset; a preset that disagrees
    with the checkpoint is refused, naming the fields. The tokenizer must give every placeholder
    the model's id (ids must agree with checkpoints)."""
    source, preset = checkpoint_model_config(config), config.model.preset
    if source is not None:
        model, _ = load_model_config(source)
        if preset is not None and (differences := get_preset(preset).differences(model)):
            fields = "; ".join(
                f"{name}: preset {mine!r}, checkpoint {theirs!r}" for name, (mine, theirs) in differences.items()
            )
            raise ConfigError(
                f"model.preset {preset!r} disagrees with the model config of {source}: {fields}. "
                "Drop model.preset to train the checkpoint's model"
            )
        described = f"the model of {source}"
    elif preset is None:
        raise ConfigError("set model.preset (e.g. qwen2.5-14b) or --load a checkpoint that carries its model config")
    else:
        model, described = get_preset(preset), f"preset {preset!r}"
    lacking = [token for token in CONTEXT_TOKENS if token not in model.context_tokens]
    if lacking:
        raise ConfigError(
            f"{described} defines no {', '.join(lacking)} (an InternVL conversion puts every tile on "
            "<IMG_CONTEXT>); training lays images and videos out as Long-VITA does and needs them"
        )
    for token, token_id in model.context_tokens.items():
        if tokenizer.ids[token] != token_id:
            raise ConfigError(
                f"tokenizer {config.data.tokenizer}: {token} has id {tokenizer.ids[token]}, {described} "
                f"uses {token_id}; use the tokenizer the checkpoint was trained with"
            )
    if tokenizer.vocab_size > model.decoder.vocab_size:
        raise ConfigError(
            f"tokenizer {config.data.tokenizer} has {tokenizer.vocab_size} tokens, more than "
            f"{described}'s vocabulary ({model.decoder.vocab_size})"
        )
    return model


def head_config(config: TrainConfig) -> HeadConfig:
    mode = config.model.lm_head
    return HeadConfig(mode=mode, chunk_size=config.model.lm_head_chunk_size if mode != "full" else None)


def make_forward_step(config: TrainConfig):
    cp_size = config.parallel.context_parallel_size

    def forward_step(data_iterator: Iterator[dict], model):
        batch = next(data_iterator)
        total_length = batch["tokens"].shape[1]
        packed = None
        if batch["cu_seqlens"] is not None:
            packed = packed_seq_params_for_context_parallel(batch["cu_seqlens"], total_length)
        if cp_size > 1:  # the vision tower sees every tile; the decoder sees this rank's zigzag share
            batch = split_batch_for_context_parallel(batch, cp_size, parallel_state.get_context_parallel_rank())
        output = model(
            batch["tokens"],
            batch["position_ids"],
            None,
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
            packed_seq_params=packed,
        )
        return output, functools.partial(masked_loss, batch["loss_mask"])

    return forward_step


def build_loader(config: TrainConfig, model: ModelConfig, platform: Platform) -> BroadcastLoader:
    """This rank's micro-batches, on its device: loaded by the first rank of its TP x CP group
    and broadcast to the others."""
    data_config = config.data.for_rank(
        model,
        seed=config.seed,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )
    return BroadcastLoader(
        functools.partial(build_data_loader, data_config),
        parallel_state.get_tensor_and_context_parallel_group(),
        platform.local_device(),
    )


def setup(config: TrainConfig, model: ModelConfig, platform: Platform) -> TrainState:
    dtype = config.params_dtype
    provider = MODEL_PROVIDERS.get(config.model.provider)(
        model,
        config.parallel,
        params_dtype=dtype,
        recompute_language_layers=config.model.recompute_num_layers,
        recompute_vision_layers=config.model.vision_recompute_num_layers,
        platform=platform,
        packed_documents=config.data.packing == "reset",
        head=head_config(config),
    )
    chunks = build_model_chunks(provider)
    for chunk in chunks:
        chunk.freeze(
            vision=config.model.freeze_vision,
            projector=config.model.freeze_projector,
            language_model=config.model.freeze_language_model,
        )
    optim = config.optimizer
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        clip_grad=optim.clip_grad,
        bf16=config.bf16,
        params_dtype=dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    return setup_training(
        chunks, optimizer_config, schedule=config.schedule, config_overrides=vision_lr_overrides(config, model) or None
    )


def _restore(config: TrainConfig, state: TrainState, loader) -> int:
    """Resume the run in --save, else start from --load (a run of ours or a converted HF model)."""

    def resume(save_dir: str) -> int:
        resumed = load_training_checkpoint(save_dir, state.model, state.optimizer, state.scheduler)
        if resumed.data is not None:
            loader.load_state_dict(resumed.data)
        return resumed.iteration

    ckpt = config.checkpoint
    if ckpt.save and latest_checkpoint_dir(ckpt.save) is not None:
        return resume(ckpt.save)
    if ckpt.load:
        latest = latest_checkpoint_dir(ckpt.load)
        if latest is not None and not ckpt.finetune:
            return resume(ckpt.load)
        source = latest or ckpt.load  # --finetune / converted HF: weights only, fresh optimizer
        load_model(state.model, source, allow_unused=ckpt.allow_unused_tensors)
        logger.info("loaded weights from %s (fresh optimizer, scheduler and data)", source)
    return 0


def prepare(config: TrainConfig) -> tuple[TrainState, object, ModelConfig]:
    """Validate, apply the platform's patches, initialise the process groups, build model +
    optimizer and this rank's data."""
    preset = config.model.preset
    config.validate(int(os.environ.get("WORLD_SIZE", "1")), get_preset(preset) if preset is not None else None)
    if not config.data.mixture or not config.data.tokenizer:
        raise ConfigError(
            "set the data mixture (data.mixture / --data-path) and the tokenizer (data.tokenizer / --tokenizer-model)"
        )
    platform = setup_platform()
    initialize_distributed(config.parallel, seed=config.seed, platform=platform)
    from megatron_longvita.data import ChatTokenizer

    model = resolve_model(config, ChatTokenizer.from_dir(config.data.tokenizer))
    model.validate_parallel(config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size)
    return setup(config, model, platform), build_loader(config, model, platform), model


def train(config: TrainConfig) -> list[float]:
    """Run the stage under a torchrun environment; per-step losses on the logging rank."""
    return run_iterations(config, *prepare(config))


def run_iterations(config: TrainConfig, state: TrainState, loader, model: ModelConfig) -> list[float]:
    world_size = torch.distributed.get_world_size()
    # generate.py and mcore2hf rebuild the model from this file next to the weights
    model_config_writer = functools.partial(
        save_model_config, config=model, dtype=config.params_dtype, tokenizer=config.data.tokenizer
    )
    if not config.checkpoint.save:
        logger.warning("no --save given: this run writes no checkpoints")
    start = _restore(config, state, loader)
    writer = None
    if config.logging.tensorboard_dir and is_logging_rank():
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(config.logging.tensorboard_dir)
    batches = iter(loader)
    num_microbatches = config.num_microbatches(world_size)
    losses = []
    tokens_since_log, started = 0, time.perf_counter()
    skipped: Counter[str] = Counter()  # bad samples by reason, since the start of this process
    forward_step = make_forward_step(config)

    def counting(iterator: Iterator[dict]) -> Iterator[dict]:
        nonlocal tokens_since_log
        for batch in iterator:
            tokens_since_log += int(batch["stats"]["real_tokens"])
            skipped.update(batch["stats"]["skipped"])
            yield batch

    counted = counting(batches)
    # with interleaving every model chunk walks the same micro-batches
    data = counted if len(state.model) == 1 else list(itertools.tee(counted, len(state.model)))
    for iteration in range(start + 1, config.schedule.train_iters + 1):
        result = train_step(
            state, forward_step, data, num_microbatches, config.data.seq_length, config.data.micro_batch_size
        )
        if result.loss is not None:
            losses.append(result.loss)
        if iteration % config.logging.log_interval == 0 and is_logging_rank():
            elapsed = time.perf_counter() - started
            record = {
                "iteration": iteration,
                "loss": round(result.loss, 5),
                "lr": state.optimizer.param_groups[0]["lr"],
                "grad_norm": result.grad_norm,
                "tokens_per_s": round(tokens_since_log / elapsed, 1),
                "skipped": dict(skipped),
                "max_rss_mb": round(_max_rss_mb(), 1),
            }
            logger.info(json.dumps(record))
            if writer is not None:
                for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                    if record[key] is not None:
                        writer.add_scalar(f"train/{key}", record[key], iteration)
            tokens_since_log, started = 0, time.perf_counter()
        ckpt, exit_interval = config.checkpoint, config.schedule.exit_interval
        exiting = bool(exit_interval) and iteration % exit_interval == 0
        if ckpt.save and (
            (ckpt.save_interval and iteration % ckpt.save_interval == 0)
            or exiting
            or iteration == config.schedule.train_iters
        ):
            save_training_checkpoint(
                ckpt.save,
                iteration,
                state.model,
                state.optimizer,
                state.scheduler,
                loader.state_dict(),
                write_extra=model_config_writer,
            )
        if exiting:
            logger.info("--exit-interval %d reached at iteration %d", exit_interval, iteration)
            break
    if writer is not None:
        writer.close()
    return losses


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    config = parse_args(argv)
    try:
        train(config)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
