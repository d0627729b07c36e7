/* use_moe_ep.c -- a program built only against the installed headers, found through
   pkg-config (make check-install): the transport's relative include of the core must
   resolve there, and the .pc file's version must be the header's and moe_ep_version()'s.

       use_moe_ep "$(pkg-config --modversion moe_ep)" */
#define MOE_EP_IMPLEMENTATION
#include "transports/moe_ep_pthreads.h"

#include <stdio.h>
#include <string.h>

int main(int argc, char** argv) {
    if (argc != 2 || strcmp(argv[1], MOE_EP_VERSION_STRING) != 0) {
        fprintf(stderr, "use_moe_ep: moe_ep.pc says %s, the installed header %s\n", argc == 2 ? argv[1] : "(nothing)",
                MOE_EP_VERSION_STRING);
        return 1;
    }
    if (strcmp(moe_ep_version(), MOE_EP_VERSION_STRING) != 0) {
        fprintf(stderr, "use_moe_ep: moe_ep_version() says %s, the header %s\n", moe_ep_version(), MOE_EP_VERSION_STRING);
        return 1;
    }
    printf("use_moe_ep: moe_ep %s, %s\n", moe_ep_version(), moe_ep_result_string(MOE_EP_OK));
    return 0;
}
