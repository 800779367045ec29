import os

# Tests run on the CPU platform whatever the machine has, unless asked otherwise.
os.environ.setdefault("LONGVITA_PLATFORM", "cpu")
