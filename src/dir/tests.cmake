agorafs_add_test(dir_test ${CMAKE_CURRENT_LIST_DIR}/dir_test.cc)
