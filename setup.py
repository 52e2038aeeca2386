"""AlphaGRPO on Ray: GRPO for unified (AR + diffusion) multimodal models.

Dependencies are pinned: the CPU test machine installs torch 2.13.0 (CPU build) *first*
(see the Makefile), so nothing here may pull a different torch.
"""
from setuptools import find_packages, setup

CORE = [
    "torch==2.13.0",
    "numpy==2.4.6",
    "transformers==5.19.0",
    "diffusers==0.42.1",
    "peft==0.21.2",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "pillow==13.0.0",
    "omegaconf==2.4.0",
    "pyarrow==26.0.1",
    "tqdm==4.70.1",
    "ray[default]==2.60.0",
    "deepspeed==0.19.8",
    "xxhash==3.6.0",
    "tensorboard==2.21.0",
]

setup(
    name="alphagrpo",
    version="0.1.0",
    description="GRPO for unified multimodal models (BAGEL-style AR + rectified flow) on Ray",
    python_requires=">=3.11",
    packages=find_packages(include=["umm*", "grpo*", "worlds*", "shapes*", "actors*", "driver*",
                                    "reward_service*", "cluster*"]),
    include_package_data=True,
    install_requires=CORE,
    # plugins the trainer finds by name (worlds.load, umm.tokenizer): the embedded shapes world and its
    # word-level tokenizer; a user's own world registers the same way from its own package
    entry_points={
        "alphagrpo.worlds": ["shapes = shapes.plugin:ShapesWorld"],
        "alphagrpo.tokenizers": ["shapes = shapes.tokenizer:ShapesTokenizer"],
    },
    extras_require={
        "test": ["pytest==9.2.0", "hypothesis==6.170.17"],
        # GPU machines serve the reward models with the CUDA vLLM build.
        "gpu": ["vllm"],
    },
)
