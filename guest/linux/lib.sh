# Helpers for guest scripts: `. /outboard/lib.sh`.

# param NAME DEFAULT: the value of NAME=value on the kernel command line, else DEFAULT.
# Scripts take their parameters this way, e.g. `outboard.fio.size=64M`.
param() {
    for word in $(cat /proc/cmdline); do
        case "$word" in
        "$1"=*)
            echo "${word#*=}"
            return
            ;;
        esac
    done
    echo "$2"
}
