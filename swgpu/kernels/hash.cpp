// swgpu-hash HEADER... -- SOURCE: the 64-bit FNV-1a that src/gpu/nvrtc.rs keys kernels by (each
// header's bytes and a NUL byte, then the source's bytes), as 16 hex digits. The libnvrtc stand-in
// computes the same over what nvrtcCreateProgram receives.
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static uint64_t feed(uint64_t h, const char* path, int* ok) {
    FILE* f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "swgpu-hash: cannot read %s\n", path);
        *ok = 0;
        return h;
    }
    int c;
    while ((c = fgetc(f)) != EOF) {
        h ^= (uint64_t)(unsigned char)c;
        h *= 0x100000001b3ull;
    }
    fclose(f);
    return h;
}

int main(int argc, char** argv) {
    uint64_t h = 0xcbf29ce484222325ull;
    int ok = 1, i = 1;
    for (; i < argc && strcmp(argv[i], "--"); i++) {
        h = feed(h, argv[i], &ok);
        h *= 0x100000001b3ull;  // the NUL byte: h ^= 0 changes nothing
    }
    if (i + 2 != argc) {
        fprintf(stderr, "usage: swgpu-hash HEADER... -- SOURCE\n");
        return 2;
    }
    h = feed(h, argv[i + 1], &ok);
    if (!ok) return 1;
    printf("%016llx\n", (unsigned long long)h);
    return 0;
}
