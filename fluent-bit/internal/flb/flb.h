/*
 * The parts of Fluent Bit's Go proxy ABI the plugin uses, written from the layouts in
 * fluent/fluent-bit include/fluent-bit/flb_plugin_proxy.h, flb_api.h, flb_config_map.h
 * and src/proxy/go/go.h (LP64: x86-64 and arm64). Only fields whose offsets have not
 * changed since Fluent Bit v2.0 are read or written; the def's newer fields are handled
 * in flb.go by size.
 */
#ifndef AUDITRELAY_FLB_H
#define AUDITRELAY_FLB_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <malloc.h>

#define AUDITRELAY_FLB_PROXY_OUTPUT_PLUGIN 2
#define AUDITRELAY_FLB_PROXY_GOLANG 11
#define AUDITRELAY_FLB_CONFIG_MAP_STR 0

/* struct flb_plugin_proxy_def up to v4.2.2 (32 bytes); event_type (v4.2.3) and
 * config_map (v5.1.1) follow and are reached through the offsets below. */
struct auditrelay_proxy_def {
    int type;
    int proxy;
    int flags;
    char *name;
    char *description;
};

#define AUDITRELAY_DEF_CONFIG_MAP_OFFSET 40
#define AUDITRELAY_DEF_SIZE_WITH_CONFIG_MAP 48

/* struct flb_config_map (104 bytes): the public head that plugins fill, then the lookup
 * value and list link that Fluent Bit fills in its own copies. */
struct auditrelay_config_map {
    int type;
    char *name;
    char *def_value;
    int flags;
    int set_property;
    uintptr_t offset;
    char *desc;
    unsigned char value[40]; /* struct flb_config_map_val */
    unsigned char head[16];  /* struct mk_list */
};

_Static_assert(sizeof(struct auditrelay_config_map) == 104, "struct flb_config_map is 104 bytes");
_Static_assert(offsetof(struct auditrelay_config_map, desc) == 40, "flb_config_map.desc at 40");

/* struct flb_api: function pointers, in order, since v2.0.0. */
struct auditrelay_api {
    const char *(*output_get_property)(const char *, void *);
    void *input_get_property;
    void *output_get_cmt_instance;
    void *input_get_cmt_instance;
    void (*log_print)(int, const char *, int, const char *, ...);
    void *input_log_check;
    int (*output_log_check)(void *, int);
};

/* struct flb_plugin_proxy_context */
struct auditrelay_proxy_context {
    void *remote_context;
    void *proxy;
};

/* The head of struct flbgo_output_plugin (src/proxy/go/go.h), unchanged since v1.4.0. */
struct auditrelay_go_output {
    char *name;
    struct auditrelay_api *api;
    void *o_ins;
    struct auditrelay_proxy_context *context;
};

static inline void auditrelay_set_config_map(void *def, struct auditrelay_config_map *map)
{
    *(struct auditrelay_config_map **) ((char *) def + AUDITRELAY_DEF_CONFIG_MAP_OFFSET) = map;
}

static inline const char *auditrelay_get_property(struct auditrelay_api *api, void *o_ins,
                                                  const char *key)
{
    return api->output_get_property(key, o_ins);
}

static inline void auditrelay_log(struct auditrelay_api *api, void *o_ins, int level,
                                  const char *line)
{
    if (api->output_log_check != NULL && !api->output_log_check(o_ins, level)) {
        return;
    }
    if (api->log_print != NULL) {
        api->log_print(level, NULL, 0, "%s", line);
    }
}

#endif
