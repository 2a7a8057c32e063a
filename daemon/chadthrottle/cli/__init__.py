"""chadthrottlectl, the command-line client (a D-Bus client only; never imports the engine)."""
