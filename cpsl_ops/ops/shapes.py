"""One fake kernel per op, for both backends.

:func:`register_fake` registers a shape function as the fake kernel of the native op
``cpsl_ops::<name>`` (where the extension loaded: registering one for an op that does not exist
would break ``import cpsl_ops``) and of the reference backend's op ``cpsl_ops_reference::<name>``,
so that torch.compile, ``torch.export`` and FakeTensorMode see the same output metadata on both.
"""

from typing import Callable, TypeVar

import torch

from cpsl_ops._loader import native_available


Fake = TypeVar("Fake", bound=Callable[..., object])


def register_fake(name: str) -> Callable[[Fake], Fake]:
    """A decorator: registers the function as both ops' fake kernel and returns it unchanged."""

    def register(fake: Fake) -> Fake:
        torch.library.register_fake(f"cpsl_ops_reference::{name}")(fake)
        if native_available():
            torch.library.register_fake(f"cpsl_ops::{name}")(fake)
        return fake

    return register
