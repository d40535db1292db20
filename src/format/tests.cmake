agorafs_add_test(format_test ${CMAKE_CURRENT_LIST_DIR}/format_test.cc)
