"""Test and demo fixtures, fenced off from the library: the seeded synthetic QA world (`synthetic`)
and the tiny random chat model (`tiny_model`). The library imports them only to build the `tiny`
model on request; nothing else depends on them."""
