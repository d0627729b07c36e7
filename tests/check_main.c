/* check_main.c -- runs every moe_ep suite; exit status non-zero if any test failed.

   Run with CK_FORK=no (make check-core does): libgomp deadlocks in a forked child once
   the parent has used OpenMP, and rank threads must not be forked either. */
#include "check_moe_ep.h"

#include <stdlib.h>

int main(void) {
    SRunner* runner = srunner_create(api_suite());
    int failed;
    srunner_add_suite(runner, router_suite());
    srunner_add_suite(runner, placement_suite());
    srunner_add_suite(runner, plan_suite());
    srunner_add_suite(runner, ffn_suite());
    srunner_add_suite(runner, layer_suite());
    srunner_add_suite(runner, capacity_suite());
    srunner_add_suite(runner, validation_suite());
    srunner_add_suite(runner, failure_suite());
    srunner_add_suite(runner, expert_fn_suite());
    srunner_add_suite(runner, layout_suite());
    srunner_add_suite(runner, routing_suite());
    srunner_add_suite(runner, ffn_variants_suite());
    srunner_add_suite(runner, families_suite());
    srunner_add_suite(runner, faults_suite());
    srunner_add_suite(runner, hostile_suite());
    srunner_add_suite(runner, safetensors_suite());
    srunner_add_suite(runner, formats_suite());
    srunner_add_suite(runner, row_lists_suite());
    srunner_add_suite(runner, bf16_dot_suite());
    srunner_add_suite(runner, barriers_suite());
    srunner_run_all(runner, CK_NORMAL);
    failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
