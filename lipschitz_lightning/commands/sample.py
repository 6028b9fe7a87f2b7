"""Generate text from a language-model checkpoint (Hydra-style overrides, defaults in conf/sample.yaml):

    python -m lipschitz_lightning.sample ckpt_path=logs/.../checkpoints/last.ckpt prompt="ROMEO:" \\
        num_tokens=200 temperature=0.8 seed=0

The checkpoint alone is enough: it carries the network's constructor arguments and its vocabulary,
the characters of a character-level model (``model=gpt``) or the tokenizer's name of a BPE one
(``model=nanogpt``: GPT-2's, decoded with tiktoken). Prints the prompt followed by the continuation.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from lipschitz_lightning.commands.extras import needs
from lipschitz_lightning.data.shakespeare import CharVocab
from lipschitz_lightning.errors import ConfigError, LipschitzLightningError, exit_with
from lipschitz_lightning.lit.checkpoints import load_network
from lipschitz_lightning.models.gpt import GPT


class Tokenizer:
    """A tiktoken encoding with ``CharVocab``'s interface: text <-> token ids."""

    def __init__(self, name: str):
        tiktoken = needs("tiktoken", f"ckpt_path's model reads {name} tokens: sampling it needs tiktoken")
        try:
            self.encoding = tiktoken.get_encoding(name)
        except Exception as error:  # tiktoken fetches its files once, from the network, then caches them
            first_line = str(error).splitlines()[0][:200] if str(error) else ""
            raise ConfigError(
                f"the {name} tokenizer's files could not be loaded ({type(error).__name__}: {first_line}): run once with network "
                f"access, or point TIKTOKEN_CACHE_DIR at a folder that holds them"
            ) from None

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.encoding.encode(text, allowed_special="all"), dtype=torch.int64)

    def decode(self, tokens) -> str:
        return self.encoding.decode([int(t) for t in tokens])


def load_language_model(ckpt_path: str | Path, device: str = "cpu") -> tuple[GPT, CharVocab | Tokenizer]:
    saved = load_network(ckpt_path, device)
    if not isinstance(saved.net, GPT):
        raise ConfigError(f"ckpt_path must be a language-model checkpoint (model=gpt or model=nanogpt), got {str(saved.path)!r}, which holds a {saved.target}")
    if saved.vocab:
        return saved.net, CharVocab(saved.vocab)
    if saved.tokenizer:
        return saved.net, Tokenizer(saved.tokenizer)
    raise ConfigError(f"ckpt_path {str(saved.path)!r} holds neither a character vocabulary nor a tokenizer's name: it cannot be decoded")


def sample(cfg: DictConfig) -> str:
    """The prompt and its continuation (settings already checked: ``settings.SampleSettings``)."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, vocab = load_language_model(cfg.ckpt_path, device)
    prompt = str(cfg.prompt)
    try:
        prompt_tokens = vocab.encode(prompt).to(device)
    except ValueError as error:
        raise ConfigError(f"prompt has characters outside the checkpoint's vocabulary: {error}") from None
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return prompt + vocab.decode(model.generate(prompt_tokens, cfg.num_tokens, cfg.temperature, generator, min(len(vocab), model.config.vocab_size)))


def run(cfg: DictConfig) -> None:
    """The command, once its settings are checked (``commands.cli.command_main``)."""
    try:
        print(sample(cfg), flush=True)
    except LipschitzLightningError as error:
        exit_with(error)


def main(argv: list[str] | None = None) -> None:
    from lipschitz_lightning.commands.cli import command_main

    command_main("sample", argv)


if __name__ == "__main__":
    main()
