// Keeps both libraries loadable on glibc 2.28 (manylinux_2_28, torch's own floor) when they are
// built on a newer system. A reference to exp, log or dlsym binds to the newest version the build
// machine's glibc has (2.29 for the faster exp/log, 2.34 for dlsym moved into libc), and GCC 12's
// libstdc++ headers read __libc_single_threaded (2.32). Hidden local definitions catch those
// references inside the library; the first three forward to the oldest versions, which every
// x86_64 glibc exports, and the flag stays 0 ("maybe multi-threaded"), so libstdc++'s inline
// reference counting always takes its atomic path, correct with or without threads.
//
// Deliberately includes no header: the glibc declarations carry default visibility and noexcept
// specifications that these definitions would contradict. tools/wheel_policy.py (CI) checks the
// symbol versions the libraries import.
#if defined(__x86_64__) && defined(__linux__)

extern "C" {

__asm__(".symver cpsl_ops_glibc_exp, exp@GLIBC_2.2.5");
__asm__(".symver cpsl_ops_glibc_log, log@GLIBC_2.2.5");
__asm__(".symver cpsl_ops_glibc_dlsym, dlsym@GLIBC_2.2.5");
double cpsl_ops_glibc_exp(double);
double cpsl_ops_glibc_log(double);
void* cpsl_ops_glibc_dlsym(void*, const char*);

__attribute__((visibility("hidden"))) double exp(double x) { return cpsl_ops_glibc_exp(x); }
__attribute__((visibility("hidden"))) double log(double x) { return cpsl_ops_glibc_log(x); }
__attribute__((visibility("hidden"))) void* dlsym(void* handle, const char* name) {
  return cpsl_ops_glibc_dlsym(handle, name);
}
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

}  // extern "C"

#endif
