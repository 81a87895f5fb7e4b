"""The compiled parts of Sluice; everything else is declared in pyproject.toml.

setuptools builds these with the normal ``pip install`` (editable installs put them beside
their Python modules). They need only a C compiler and Python's headers. Warnings are errors.
``SLUICE_SANITIZE=1`` builds them with AddressSanitizer and UBSan (``make sanitize``).
"""

import os

from setuptools import Extension, setup

CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-missing-field-initializers"]
LDFLAGS: list[str] = []
if os.environ.get("SLUICE_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
    CFLAGS += san
    LDFLAGS += san

HEADERS = ["shm/_layout.h", "shm/_record.h"]

setup(
    ext_modules=[
        Extension(
            "daemon._batcher",
            sources=["daemon/_batcher.c"],
            depends=HEADERS,
            extra_compile_args=CFLAGS,
            extra_link_args=LDFLAGS,
        ),
        Extension(
            "shm._client",
            sources=["shm/_client.c"],
            depends=HEADERS,
            extra_compile_args=CFLAGS,
            extra_link_args=LDFLAGS,
        ),
    ],
)
