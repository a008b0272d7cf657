# Proves that the run switch works: prints one line and exits 0.
echo "OUTBOARD_HELLO kernel=$(uname -r) cpus=$(nproc)"
# t
