"""What runs things: the numpy reference, data loaders, the cffi loader and the QEMU/ssh runners."""
