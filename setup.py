"""prores-megatron: Progressive Residual Warmup for megatron-core / Megatron-LM."""

from setuptools import find_packages, setup

setup(
    name="prores-megatron",
    version="0.1.0",
    description="Progressive Residual Warmup (ProRes) for megatron-core and Megatron-LM pretraining",
    license="Apache-2.0",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["prores_megatron", "prores_megatron.*"]),
    python_requires=">=3.12",
    # Neither torch nor megatron-core: installing into an existing Megatron environment (an NGC or
    # NeMo container, a Megatron-LM git checkout) must never replace or shadow what it runs. The
    # supported range is checked when the Megatron-dependent parts import (core/compat.py); a fresh
    # environment gets the pinned stack from tools/setup_env.sh, or from the [megatron] extra.
    install_requires=["numpy"],
    extras_require={
        "megatron": ["megatron-core>=0.19.0,<0.20"],
        "training": ["megatron-core[training]>=0.19.0,<0.20"],
        "hf": ["transformers", "safetensors", "sentencepiece"],
        "test": ["pytest"],
    },
    entry_points={
        "console_scripts": [
            "prores-megatron-pretrain=prores_megatron.training.pretrain_gpt:main",
            "prores-megatron-convert-to-hf=prores_megatron.export.convert_to_hf:main",
            "prores-megatron-train-tokenizer=prores_megatron.data.tokenizer_training:main",
            "prores-megatron-preprocess-data=prores_megatron.data.indexed_data:main",
            "prores-megatron=prores_megatron.analysis.cli:main",
        ]
    },
)
