// Local copies of the libstdc++ symbols newer than GLIBCXX_3.4.25 (GCC 8, manylinux_2_28) that code
// built with GCC >= 9 references out of line: the string streams of the error messages (ours and
// those of torch's stable-ABI headers) and std::vector's length check. Explicit instantiations
// make the compiler emit them here, and the link's version script (exports.map) keeps them local,
// so the libraries need only what torch's own libraries need from the system libstdc++.
#include <new>
#include <sstream>
#include <string>

#if defined(__GLIBCXX__) && defined(_GLIBCXX_RELEASE) && _GLIBCXX_USE_CXX11_ABI
#if _GLIBCXX_RELEASE >= 9  // GLIBCXX_3.4.26: the default constructors split from the openmode ones
template std::stringstream::basic_stringstream();
template std::ostringstream::basic_ostringstream();
#endif
#if _GLIBCXX_RELEASE >= 11 && __cplusplus > 201703L  // GLIBCXX_3.4.29: C++20's ref-qualified str()
template std::string std::stringbuf::str() const&;
template std::string std::stringbuf::str() &&;
#endif
#if _GLIBCXX_RELEASE >= 11  // GLIBCXX_3.4.29
namespace std {
void __throw_bad_array_new_length() { throw bad_array_new_length(); }
}  // namespace std
#endif
#endif
