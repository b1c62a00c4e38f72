"""The microvm provider: QEMU microVMs with their own kernel (docs/microvm-provider.md)."""
