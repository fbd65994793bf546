/* msa_cupy's XLA FFI handler: a decode step (DecodePlan.update + run) as an XLA custom call,
 * with no Python at run time.
 *
 * msa_cupy.jax flattens the step's prepared launches (msa_cupy._jit.Program) into a program:
 * one word array, registered here under a key before XLA compiles the call.  Each call looks
 * the program up by (key, device), writes the addresses of XLA's buffers into copies of the
 * launches' argument cells, zeroes the plan's counters in the workspace (one more output) and
 * launches every kernel on XLA's stream through cuLaunchKernelEx.  No allocation, no host
 * sync, the same device work at every call: safe to trace into XLA's command buffers.
 *
 * Program layout (int64 words, msa_cupy._jit.flat_program / msa_cupy._native):
 *   header: PROGRAM_MAGIC, n_launches, n_args, n_rets, workspace alignment,
 *           counter offset, counter bytes, cuLaunchKernelEx, cuMemsetD8Async
 *   per launch (LAUNCH_WORDS): function, grid x y z, block x y z, shared bytes, programmatic
 *               (0/1), n_cells, cells (address of n_cells 8-byte words), n_binds,
 *               then n_binds x (cell, source, offset)
 *   source: 0 .. n_args-1 an operand, n_args .. n_args+n_rets-1 a result, -1 the workspace
 *   (the last result, its address rounded up to the alignment). */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <pthread.h>
#include <stdatomic.h>

#include "xla/ffi/api/c_api.h"

#define PROGRAM_MAGIC 0x4d5341666669ll /* "MSAffi" */
#define HEADER_WORDS 9
#define LAUNCH_WORDS 12
#define MAX_CELLS 64
#define MAX_PROGRAMS 4096
#define SOURCE_WORKSPACE (-1)
#define PROGRAMMATIC_STREAM_SERIALIZATION 6 /* CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION */

/* CUlaunchConfig and CUlaunchAttribute as cuda.h lays them out (no CUDA header needed here) */
typedef struct {
  _Alignas(8) int id; /* the value union holds 64-bit members */
  char pad[4];
  int value[16];
} LaunchAttribute;

typedef struct {
  unsigned grid[3], block[3], shared;
  void* stream;
  LaunchAttribute* attrs;
  unsigned n_attrs;
} LaunchConfig;

typedef int (*LaunchEx)(const LaunchConfig*, void* function, void** params, void** extra);
typedef int (*MemsetAsync)(uintptr_t ptr, unsigned char value, size_t bytes, void* stream);

/* ------------------------------------------------------------------ the registry */

typedef struct {
  int64_t key;
  int32_t device;
  const int64_t* program;
} Entry;

static Entry registry[MAX_PROGRAMS];
static int registered;
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;

/* Register (or replace) the program of key on device: 0, or -1 when the registry is full.  The
 * caller keeps the program's words (and the cells they point to) alive for good. */
int msa_cupy_register(int64_t key, int32_t device, const int64_t* program) {
  int i, status = -1;
  pthread_mutex_lock(&registry_lock);
  for (i = 0; i < registered; ++i)
    if (registry[i].key == key && registry[i].device == device) break;
  if (i < MAX_PROGRAMS) {
    registry[i].key = key;
    registry[i].device = device;
    registry[i].program = program;
    if (i == registered) ++registered;
    status = 0;
  }
  pthread_mutex_unlock(&registry_lock);
  return status;
}

/* device < 0: the only program of key (a runtime that cannot name the device) */
static const int64_t* lookup(int64_t key, int32_t device) {
  const int64_t* found = NULL;
  int matches = 0;
  pthread_mutex_lock(&registry_lock);
  for (int i = 0; i < registered; ++i)
    if (registry[i].key == key && (device < 0 || registry[i].device == device)) {
      found = registry[i].program;
      ++matches;
    }
  pthread_mutex_unlock(&registry_lock);
  return matches == 1 ? found : NULL;
}

/* ------------------------------------------------------------------ running a program */

/* The address of source s: an operand, a result, or the aligned workspace. */
static uintptr_t source_address(int64_t s, void* const* args, void* const* rets, int64_t n_args,
                                uintptr_t workspace) {
  if (s == SOURCE_WORKSPACE) return workspace;
  if (s < n_args) return (uintptr_t)((const XLA_FFI_Buffer*)args[s])->data;
  return (uintptr_t)((const XLA_FFI_Buffer*)rets[s - n_args])->data;
}

/* Run program on stream: 0, or the failing CUresult (and its launch in *failed_launch). */
int msa_cupy_run_program(const int64_t* program, void* const* args, int64_t n_args, void* const* rets,
                         int64_t n_rets, void* stream, int* failed_launch) {
  const int64_t* p = program;
  const int64_t n_launches = p[1], align = p[4];
  const LaunchEx launch_ex = (LaunchEx)(uintptr_t)p[7];
  const MemsetAsync memset_async = (MemsetAsync)(uintptr_t)p[8];
  uintptr_t workspace = (uintptr_t)((const XLA_FFI_Buffer*)rets[n_rets - 1])->data;
  workspace = (workspace + (uintptr_t)align - 1) & ~((uintptr_t)align - 1);
  *failed_launch = -1;
  if (p[6] > 0) {  /* a new workspace every call: the counters start at zero */
    int status = memset_async(workspace + (uintptr_t)p[5], 0, (size_t)p[6], stream);
    if (status) return status;
  }
  LaunchAttribute serialization;
  memset(&serialization, 0, sizeof serialization);
  serialization.id = PROGRAMMATIC_STREAM_SERIALIZATION;
  serialization.value[0] = 1;
  p += HEADER_WORDS;
  for (int64_t l = 0; l < n_launches; ++l) {
    uint64_t cells[MAX_CELLS];
    void* params[MAX_CELLS];
    LaunchConfig config;
    const int64_t n_cells = p[9], n_binds = p[11];
    memcpy(cells, (const void*)(uintptr_t)p[10], (size_t)n_cells * sizeof(uint64_t));
    const int64_t* bind = p + LAUNCH_WORDS;
    for (int64_t b = 0; b < n_binds; ++b, bind += 3)
      cells[bind[0]] = source_address(bind[1], args, rets, n_args, workspace) + (uintptr_t)bind[2];
    for (int64_t c = 0; c < n_cells; ++c) params[c] = &cells[c];
    for (int d = 0; d < 3; ++d) {
      config.grid[d] = (unsigned)p[1 + d];
      config.block[d] = (unsigned)p[4 + d];
    }
    config.shared = (unsigned)p[7];
    config.stream = stream;
    config.attrs = p[8] ? &serialization : NULL;
    config.n_attrs = p[8] ? 1 : 0;
    int status = launch_ex(&config, (void*)(uintptr_t)p[0], params, NULL);
    if (status) {
      *failed_launch = (int)l;
      return status;
    }
    p = bind;
  }
  return 0;
}

/* A program's words are checked once, when it is registered (msa_cupy._native): counts in
 * range, every bound cell inside its launch. 0 when sound, else the offending word's index. */
int64_t msa_cupy_check_program(const int64_t* program, int64_t n_words) {
  if (n_words < HEADER_WORDS || program[0] != PROGRAM_MAGIC) return 0;
  const int64_t n_args = program[2], n_rets = program[3], align = program[4];
  if (n_rets < 1 || n_args < 0 || align < 1 || (align & (align - 1))) return 2;
  int64_t at = HEADER_WORDS;
  for (int64_t l = 0; l < program[1]; ++l) {
    if (at + LAUNCH_WORDS > n_words) return at;
    const int64_t n_cells = program[at + 9], n_binds = program[at + 11];
    if (n_cells < 0 || n_cells > MAX_CELLS) return at + 9;
    if (n_binds < 0 || at + LAUNCH_WORDS + 3 * n_binds > n_words) return at + 11;
    for (int64_t b = 0; b < n_binds; ++b) {
      const int64_t* bind = program + at + LAUNCH_WORDS + 3 * b;
      if (bind[0] < 0 || bind[0] >= n_cells) return at + LAUNCH_WORDS + 3 * b;
      if (bind[1] < SOURCE_WORKSPACE || bind[1] >= n_args + n_rets) return at + LAUNCH_WORDS + 1 + 3 * b;
    }
    at += LAUNCH_WORDS + 3 * n_binds;
  }
  return at == n_words ? -1 : at;
}

/* ------------------------------------------------------------------ the XLA FFI handler */

static XLA_FFI_Error* error(const XLA_FFI_Api* api, XLA_FFI_Error_Code code, const char* message) {
  XLA_FFI_Error_Create_Args e;
  memset(&e, 0, sizeof e);
  e.struct_size = XLA_FFI_Error_Create_Args_STRUCT_SIZE;
  e.message = message;
  e.errc = code;
  return api->XLA_FFI_Error_Create(&e);
}

/* The head of each extension in a call frame's chain and the metadata extension, as the C ABI
 * lays them out (size, type, next; then the metadata pointer).  Declared here: jaxlib versions
 * declare the extension base differently in C (one of them so that `ext->next` does not
 * compile), while the layout XLA passes stays the same. */
typedef struct ExtensionHead {
  size_t struct_size;
  int type; /* XLA_FFI_Extension_Type, an int-sized enum */
  const struct ExtensionHead* next;
} ExtensionHead;

typedef struct {
  ExtensionHead head;
  XLA_FFI_Metadata* metadata;
} MetadataExtension;

/* XLA asks for the handler's API version and traits with a metadata extension, not a call. */
static int answer_metadata(XLA_FFI_CallFrame* frame) {
  for (const ExtensionHead* ext = (const ExtensionHead*)(const void*)frame->extension_start; ext; ext = ext->next) {
    if (ext->type != XLA_FFI_Extension_Metadata) continue;
    XLA_FFI_Metadata* metadata = ((const MetadataExtension*)ext)->metadata;
    metadata->api_version.major_version = XLA_FFI_API_MAJOR;
    metadata->api_version.minor_version = XLA_FFI_API_MINOR;
    metadata->traits = XLA_FFI_HANDLER_TRAITS_COMMAND_BUFFER_COMPATIBLE;
    return 1;
  }
  return 0;
}

/* The int64 attribute "program" (the registry key). */
static int program_key(const XLA_FFI_Attrs* attrs, int64_t* key) {
  for (int64_t i = 0; i < attrs->size; ++i) {
    const XLA_FFI_ByteSpan* name = attrs->names[i];
    if (attrs->types[i] != XLA_FFI_AttrType_SCALAR || name->len != 7 || memcmp(name->ptr, "program", 7)) continue;
    const XLA_FFI_Scalar* scalar = (const XLA_FFI_Scalar*)attrs->attrs[i];
    if (scalar->dtype != XLA_FFI_DataType_S64) return 0;
    *key = *(const int64_t*)scalar->value;
    return 1;
  }
  return 0;
}

static int32_t device_ordinal(const XLA_FFI_Api* api, XLA_FFI_ExecutionContext* ctx) {
  if (api->struct_size < offsetof(XLA_FFI_Api, XLA_FFI_DeviceOrdinal_Get) + sizeof(void*)) return -1;
  XLA_FFI_DeviceOrdinal_Get_Args d;
  memset(&d, 0, sizeof d);
  d.struct_size = XLA_FFI_DeviceOrdinal_Get_Args_STRUCT_SIZE;
  d.ctx = ctx;
  XLA_FFI_Error* failed = api->XLA_FFI_DeviceOrdinal_Get(&d);
  if (failed) {
    XLA_FFI_Error_Destroy_Args destroy = {XLA_FFI_Error_Destroy_Args_STRUCT_SIZE, NULL, failed};
    api->XLA_FFI_Error_Destroy(&destroy);
    return -1;
  }
  return d.device_ordinal;
}

static atomic_llong executions;

/* How many times XLA ran the handler (a command buffer that replays a recording runs it once). */
long long msa_cupy_executions(void) { return atomic_load(&executions); }

XLA_FFI_Error* msa_cupy_decode_step(XLA_FFI_CallFrame* frame) {
  if (answer_metadata(frame)) return NULL;
  if (frame->stage != XLA_FFI_ExecutionStage_EXECUTE) return NULL;
  atomic_fetch_add(&executions, 1);
  const XLA_FFI_Api* api = frame->api;
  static _Thread_local char message[256];
  int64_t key;
  if (!program_key(&frame->attrs, &key))
    return error(api, XLA_FFI_Error_Code_INVALID_ARGUMENT, "msa_cupy decode step: no int64 attribute 'program'");
  const int32_t device = device_ordinal(api, frame->ctx);
  const int64_t* program = lookup(key, device);
  if (!program) {
    snprintf(message, sizeof message,
             "msa_cupy decode step: program %lld is not registered for GPU %d in this process (msa_cupy.jax "
             "registers it when the call is traced)", (long long)key, (int)device);
    return error(api, XLA_FFI_Error_Code_FAILED_PRECONDITION, message);
  }
  if (frame->args.size != program[2] || frame->rets.size != program[3]) {
    snprintf(message, sizeof message, "msa_cupy decode step: %lld operands and %lld results, the program has %lld "
             "and %lld", (long long)frame->args.size, (long long)frame->rets.size, (long long)program[2],
             (long long)program[3]);
    return error(api, XLA_FFI_Error_Code_INVALID_ARGUMENT, message);
  }
  XLA_FFI_Stream_Get_Args s;
  memset(&s, 0, sizeof s);
  s.struct_size = XLA_FFI_Stream_Get_Args_STRUCT_SIZE;
  s.ctx = frame->ctx;
  XLA_FFI_Error* failed = api->XLA_FFI_Stream_Get(&s);
  if (failed) return failed;
  int launch;
  int status = msa_cupy_run_program(program, frame->args.args, frame->args.size, frame->rets.rets, frame->rets.size,
                                    s.stream, &launch);
  if (status) {
    snprintf(message, sizeof message, "msa_cupy decode step: CUDA driver error %d (%s %d)", status,
             launch < 0 ? "memset of the counters" : "launch", launch);
    return error(api, XLA_FFI_Error_Code_INTERNAL, message);
  }
  return NULL;
}
