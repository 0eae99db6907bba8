"""Hot loops beside their reference implementations, tested equal."""
