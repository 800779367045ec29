from setuptools import find_packages, setup

setup(
    name="megatron-longvita",
    version="0.1.0",
    description="Long-VITA-style long-context vision-language training and inference on megatron-core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_longvita", "megatron_longvita.*"]) + ["megatron_longvita.patches"],
    # patches/ lives at the top of the repository (one visible home for every monkey patch)
    # and installs as a subpackage.
    package_dir={"megatron_longvita.patches": "patches"},
    install_requires=[
        "megatron-core==0.16.1",
        "torch>=2.6",
        "numpy",
        "packaging",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "pillow",
        "av",
        "pyarrow",  # parquet shards with embedded images (LLaVA-OneVision, LLaVA-ReCap, Docmatix)
        "sentencepiece",
        "psutil",  # dist_checkpointing's writer imports it at save time; without it the save hangs
        "tqdm",
        "tensorboard",  # train.py --tensorboard-dir
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "transformers>=4.52", "ruff"],
        "gpu": ["transformer-engine[pytorch]"],
    },
)
